"""A few seconds of each coverage-guided fuzzer (tests/fuzz/fuzz.py) on every run, so the
targets cannot rot; `make fuzz` runs them for as long as asked."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FUZZ = os.path.join(ROOT, "tests", "fuzz", "fuzz.py")


@pytest.mark.parametrize("target", ["codec", "framer", "fastpath", "core"])
def test_fuzzer_runs_clean(target, tmp_path):
    try:
        import atheris  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("atheris is missing in CI: the test extra must install it")
        pytest.skip("atheris not installed (pip install atheris; x86_64 wheels for 3.11-3.13)")
    corpus = tmp_path / "corpus"
    result = subprocess.run(
        [sys.executable, FUZZ, target, "-max_total_time=3", "-print_final_stats=1",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    crashes = [p.name for p in tmp_path.iterdir() if p.name.startswith("crash-")]
    assert result.returncode == 0 and not crashes, result.stderr[-3000:]
    runs = int(re.search(r"stat::number_of_executed_units: (\d+)", result.stderr).group(1))
    cov = int(re.findall(r"cov: (\d+)", result.stderr)[-1])
    assert runs > 100 and cov > 0
    assert len(os.listdir(corpus)) > 0  # seeded, and what it found is kept
