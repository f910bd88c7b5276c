"""Sandbox benchmark: rci_fast vs what users would pick instead, in the same run.

Compares, for `print(1)` and for a numpy+sympy snippet:
  - rci_fast's Sandbox (warm template, pre-forked workers, seccomp + Landlock),
  - subprocess.run([sys.executable, "-c", code]),
  - a SandboxFusion-style path: write the code to a temp file, run `bash -c "python file"`,
and reports p50/p99 latency, runs/s with 1 and 2 concurrent clients, the private memory of an idle
worker, and the floor: a bare fork + exit + wait of a process that already imported numpy and sympy
(what one isolated run costs at least on this machine, before any sandboxing or I/O).
Prints a table and a final JSON line.

    python bench/bench_sandbox.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from rci_fast.sandbox import Sandbox
from rci_fast.sandbox.bench import (NUMPY_SYMPY, PRINT_1, idle_worker_private_kb, latencies_ms,
                                    percentile, private_memory_kb, runs_per_second)

CLEAN_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "1"}

FORK_FLOOR = """
import os, sys, time, numpy, sympy
n = int(sys.argv[1]); out = []
for _ in range(n):
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    out.append((time.perf_counter() - t0) * 1e3)
print(" ".join(f"{x:.4f}" for x in out))
"""


def subprocess_run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], capture_output=True, env=CLEAN_ENV, timeout=60)


def sandboxfusion_style(code: str) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(code)
    try:
        subprocess.run(["bash", "-c", f"{sys.executable} {f.name}"], capture_output=True,
                       env=CLEAN_ENV, timeout=60)
    finally:
        os.unlink(f.name)


def fork_floor_ms(n: int) -> list[float]:
    out = subprocess.run([sys.executable, "-c", FORK_FLOOR, str(n)], capture_output=True,
                         text=True, env=CLEAN_ENV, check=True)
    return [float(x) for x in out.stdout.split()]


def measure(run_once, n: int) -> dict:
    lat = latencies_ms(run_once, n, warmup=2)
    return {"p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99),
            "runs_per_s_1_client": runs_per_second(run_once, n, 1),
            "runs_per_s_2_clients": runs_per_second(run_once, n, 2)}


def paced_p50_ms(sb: Sandbox, code: str, n: int, gap_s: float = 0.005) -> float:
    """Latency when calls arrive spaced out, as a rollout engine issues them between decode steps."""
    lat = []
    for _ in range(n):
        time.sleep(gap_s)
        t0 = time.perf_counter()
        sb.run(code)
        lat.append((time.perf_counter() - t0) * 1e3)
    return percentile(lat, 50)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs (for make demo)")
    args = parser.parse_args()
    n_fast = 200 if args.quick else 1000
    n_slow = {PRINT_1: 10 if args.quick else 40, NUMPY_SYMPY: 3 if args.quick else 8}

    results: dict = {"machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores",
                     "python": platform.python_version()}
    with Sandbox(workers=2) as sb:
        results["isolation"] = sb.isolation
        results["idle_worker_private_mb"] = idle_worker_private_kb(sb) / 1024
        results["template_private_mb"] = private_memory_kb(sb.template_pid) / 1024
        for name, code in (("print(1)", PRINT_1), ("numpy+sympy", NUMPY_SYMPY)):
            assert sb.run(code).status == "ok"
            row = {"rci_fast": measure(lambda: sb.run(code), n_fast)}
            row["rci_fast"]["paced_p50_ms"] = paced_p50_ms(sb, code, n_fast // 2)
            row["subprocess"] = measure(lambda: subprocess_run(code), n_slow[code])
            row["sandboxfusion_style"] = measure(lambda: sandboxfusion_style(code), n_slow[code])
            results[name] = row
    floor = fork_floor_ms(n_fast)
    results["fork_floor_p50_ms"] = percentile(floor, 50)

    print(f"machine: {results['machine']}; isolation: {results['isolation']}")
    print(f"{'snippet':<13}{'runner':<22}{'p50 ms':>9}{'p99 ms':>9}{'runs/s 1c':>11}{'runs/s 2c':>11}")
    for name in ("print(1)", "numpy+sympy"):
        for runner, m in results[name].items():
            print(f"{name:<13}{runner:<22}{m['p50_ms']:>9.2f}{m['p99_ms']:>9.2f}"
                  f"{m['runs_per_s_1_client']:>11.1f}{m['runs_per_s_2_clients']:>11.1f}")
        r = results[name]
        r["speedup_p50_vs_subprocess"] = r["subprocess"]["p50_ms"] / r["rci_fast"]["p50_ms"]
        r["speedup_p50_vs_sandboxfusion_style"] = (r["sandboxfusion_style"]["p50_ms"]
                                                   / r["rci_fast"]["p50_ms"])
        r["paced_speedup_p50_vs_subprocess"] = r["subprocess"]["p50_ms"] / r["rci_fast"]["paced_p50_ms"]
        r["p50_vs_fork_floor"] = r["rci_fast"]["p50_ms"] / results["fork_floor_p50_ms"]
        print(f"  {name}: back-to-back p50 {r['speedup_p50_vs_subprocess']:.0f}x faster than subprocess "
              f"({r['speedup_p50_vs_sandboxfusion_style']:.0f}x than SandboxFusion-style), "
              f"{r['p50_vs_fork_floor']:.1f}x the bare fork+exit+wait floor "
              f"({results['fork_floor_p50_ms']:.2f} ms); paced (one call every 5 ms) p50 "
              f"{r['rci_fast']['paced_p50_ms']:.2f} ms, {r['paced_speedup_p50_vs_subprocess']:.0f}x subprocess")
    print(f"idle worker private memory: {results['idle_worker_private_mb']:.1f} MiB "
          f"(worker + its pre-forked spares); template, shared by all: "
          f"{results['template_private_mb']:.0f} MiB")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
