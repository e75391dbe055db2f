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
    """Both ways to restart under load, and the hand-over's timing, seconds-long."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "handover.py"),
                             "--allocations", "50", "--rate", "1000", "--seconds", "2",
                             "--idle", "50", "--packets", "300"], capture_output=True,
                            text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "SIGUSR2 hand-over: 50 calls at 1000 datagrams/s, 50 allocations adopted: lost" in out, out
    assert "systemd-style restart: 50 calls at 1000 datagrams/s, 50 allocations adopted: lost" in out, out
    assert "hand-over of 51 allocations (made in" in out, out
