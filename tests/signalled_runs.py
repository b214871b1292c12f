"""Runs of the captioning CLI that a test signals: wait for a moment, send the signal, collect the output."""
from __future__ import annotations

import subprocess
import threading
import time

# `python -c LAUNCHER SECONDS SCRIPT ARGS...`: SCRIPT run as __main__ with pipeline's bound on the final push
# after a signal set to SECONDS (the Hub-down test would otherwise wait out the whole 20 s).
FINAL_PUSH_LAUNCHER = """
import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))  # as `python SCRIPT` puts its dir first
from vlm_caption import pipeline
pipeline.FINAL_PUSH_AFTER_SIGNAL_S = float(sys.argv.pop(0))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def with_final_push_bound(args: list[str], seconds: float) -> list[str]:
    """[python, SCRIPT, ARGS...] as the same run with pipeline.FINAL_PUSH_AFTER_SIGNAL_S set to seconds."""
    return [args[0], "-c", FINAL_PUSH_LAUNCHER, str(seconds), *args[1:]]


def signal_when_ready(proc: subprocess.Popen, ready, signum: int) -> tuple[int, str, float]:
    """ready(output so far) with the run alive, then the signal; (exit code, output, seconds to exit)."""
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        ready(output)
        assert proc.poll() is None, "the run ended before the signal"
        proc.send_signal(signum)
        start = time.monotonic()
        proc.wait(timeout=90)
        took = time.monotonic() - start
        reader.join(timeout=10)
        return proc.returncode, "".join(output), took
    finally:
        proc.kill()
