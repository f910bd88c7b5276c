"""Helpers shared by the kill -9 / resume tests."""
import os
import signal
import subprocess
import time


def kill_once_metrics_reach(cmd, cwd, metrics_path, rows: int, timeout_s: float = 120.0) -> int:
    """Starts `cmd`, SIGKILLs it as soon as `metrics_path` holds `rows` lines; returns its exit
    status (-SIGKILL when it was killed, which the caller should assert)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= rows:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait()
    return proc.returncode
