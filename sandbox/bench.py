"""Timing helpers shared by `rci-fast sandbox bench` and bench/bench_sandbox.py."""
from __future__ import annotations

import os
import threading
import time

PRINT_1 = "print(1)"
NUMPY_SYMPY = (
    "import numpy as np, sympy as sp\n"
    "x = sp.Symbol('x')\n"
    "print(sp.solve(x**2 - 4, x), int(np.arange(10).sum()))\n"
)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def latencies_ms(run_once, n: int, warmup: int = 3) -> list[float]:
    """Wall time of `run_once()` as the caller sees it, n times, after a few warm-up calls."""
    for _ in range(warmup):
        run_once()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        run_once()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def runs_per_second(run_once, n: int, clients: int) -> float:
    """Throughput with `clients` threads calling `run_once` n times in total."""
    per_client = [n // clients + (i < n % clients) for i in range(clients)]
    threads = [threading.Thread(target=lambda k=k: [run_once() for _ in range(k)]) for k in per_client]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n / (time.perf_counter() - t0)


def private_memory_kb(pid: int) -> int:
    """Private (unshared) resident memory of a process, from /proc/PID/smaps_rollup."""
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def idle_worker_private_kb(sandbox) -> float:
    """Mean private memory of an idle worker: the worker process plus its pre-forked spare child."""
    time.sleep(0.2)  # let the spare children finish their set-up
    totals = []
    for pid in sandbox.worker_pids:
        totals.append(private_memory_kb(pid) + sum(private_memory_kb(c) for c in children_of(pid)))
    return sum(totals) / len(totals)


def quick_report(sandbox, n: int = 200) -> dict:
    """Latency and throughput of the sandbox alone (what `rci-fast sandbox bench` prints)."""
    out = {}
    for name, code in (("print(1)", PRINT_1), ("numpy+sympy", NUMPY_SYMPY)):
        lat = latencies_ms(lambda: sandbox.run(code), n)
        out[name] = {
            "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "runs_per_s_1_client": runs_per_second(lambda: sandbox.run(code), n, 1),
            "runs_per_s_2_clients": runs_per_second(lambda: sandbox.run(code), n, 2),
        }
    out["idle_worker_private_mb"] = idle_worker_private_kb(sandbox) / 1024
    out["template_private_mb"] = private_memory_kb(sandbox.template_pid) / 1024
    out["cpus"] = len(os.sched_getaffinity(0))
    return out
