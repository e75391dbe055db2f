SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= conf/turnd.toml

FUZZ_SECONDS ?= 60
FUZZ_TARGETS := codec framer fastpath core

.PHONY: run test fuzz bench check-config clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# On the default config with no credentials, turnd relays with a REST secret of its own
# (.turnd/rest-secret, git-ignored, mode 0600) and prints an RTCIceServer to try it with.
FIRST_RUN := $(if $(filter conf/turnd.toml,$(CONFIG)),--first-run-secret .turnd/rest-secret,)

run: $(STAMP)
	$(BIN)/turnd serve --config $(CONFIG) $(FIRST_RUN)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Each fuzzer for FUZZ_SECONDS; what it finds is kept in .fuzz/TARGET (seeded from
# tests/corpus), crashes land in .fuzz/crash-TARGET-*.  make fuzz FUZZ_SECONDS=3600
fuzz: $(STAMP)
	@mkdir -p .fuzz
	@for t in $(FUZZ_TARGETS); do \
		echo "== fuzzing $$t for $(FUZZ_SECONDS) s"; \
		$(BIN)/python tests/fuzz/fuzz.py $$t -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
			-artifact_prefix=.fuzz/crash-$$t- .fuzz/$$t 2>&1 | grep -E "DONE|stat::number_of_executed_units|crash-|Error" ; \
		test $${PIPESTATUS[0]} -eq 0 || exit 1; \
	done

# turnd and coturn (Debian's turnserver) side by side; the table goes to bench/results/bench.md.
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

check-config: $(STAMP)
	$(BIN)/turnd check-config $(CONFIG)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis .fuzz
