"""A tiny run of each bench script, so they cannot rot. No timings are asserted."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_worst_request_bench_smoke():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "worst_request.py"),
                             "--repeat", "2"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 9, result.stdout  # the header and eight requests
    answers = [row.strip("|").split("|")[3].strip() for row in rows[1:]]
    assert answers[0].startswith("401")
    assert all(a.startswith(("400", "401", "dropped")) for a in answers), answers


def test_make_bench_smoke():
    """Every workload of `make bench`, seconds-long, against turnd (and coturn when there)."""
    import shutil
    args = [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--quick", "--repeat", "1"]
    if shutil.which("turnserver") is None:
        if os.environ.get("CI"):
            raise AssertionError("coturn's turnserver is missing in CI")
        args.append("--no-coturn")
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.split("| workload |", 1)[1]
    for label in ("many calls (", "Send/Data + FINGERPRINT", "one hot flow", "allocation set-up, many",
                  "allocation set-up, one source", "32 clients at a time", "RSS per idle allocation",
                  "workers = 1", "workers = 2"):
        assert label in table, (label, table)
    losses = [line for line in table.splitlines() if line.startswith("|   loss")]
    assert losses and all(line.split("|")[2].strip() == "0.00" for line in losses), losses


def test_handover_bench_smoke():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "handover.py"),
                             "--allocations", "50", "--packets", "300"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "handed over 51 allocations; sockets unread for" in result.stdout, result.stdout
    assert "call through the restart: " in result.stdout
