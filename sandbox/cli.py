"""`rci-fast sandbox ...`: run a file in the sandbox, benchmark it, or show what it does."""
from __future__ import annotations

import argparse
import json
import signal
import sys


def _positive(kind):
    """An argparse type: a number of `kind` above 0 (a usage error otherwise, not a traceback)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("sandbox", help="run code in the sandbox, benchmark it, demo it",
                              description="The rci_fast code sandbox (usable without the trainer).")
    sub = p.add_subparsers(dest="sandbox_command", required=True, metavar="{run,bench,demo}")

    run = sub.add_parser("run", help="run a Python file (or - for stdin) in the sandbox",
                         description="Runs FILE in a fresh sandboxed child; prints its stdout and "
                                     "stderr and exits with its exit code (125 when the sandbox "
                                     "ended it: timeout, memory, output or a violation).")
    run.add_argument("file", help="Python source file, or - to read it from stdin")
    run.add_argument("--timeout", type=_positive(float), default=10.0, help="wall-clock limit in seconds (default 10)")
    run.add_argument("--memory-mb", type=_positive(int), default=1024, help="memory limit in MiB (default 1024)")
    run.add_argument("--json", action="store_true", help="print the whole result as one JSON object")
    run.set_defaults(func=_run)

    bench = sub.add_parser("bench", help="latency and throughput of the sandbox on this machine",
                           description="Times print(1) and a numpy+sympy snippet: p50/p99 latency, "
                                       "runs/s with 1 and 2 clients, idle memory per worker. For "
                                       "the comparison with subprocess, see bench/bench_sandbox.py.")
    bench.add_argument("-n", type=_positive(int), default=300, help="runs per measurement (default 300)")
    bench.add_argument("--workers", type=_positive(int), default=None, help="workers (default: one per core)")
    bench.set_defaults(func=_bench)

    demo = sub.add_parser("demo", help="show how the sandbox answers well-behaved and hostile code",
                          description="Runs a few well-behaved and hostile snippets (an endless loop, "
                                      "a memory bomb, an output flood, fork, network, reading "
                                      "/etc/shadow, ptrace) in the sandbox and prints how each ended.")
    demo.set_defaults(func=_demo)


def _run(args) -> int:
    from rci_fast.sandbox import Sandbox

    if args.file == "-":
        code = sys.stdin.buffer.read()
    else:
        try:
            with open(args.file, "rb") as f:
                code = f.read()
        except OSError as e:
            print(f"rci-fast sandbox run: cannot read {args.file}: {e.strerror}", file=sys.stderr)
            return 2
    with Sandbox(workers=1) as sb:
        r = sb.run(code, timeout_s=args.timeout, memory_mb=args.memory_mb)
    if args.json:
        print(json.dumps(r.__dict__))
        return 0
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    if r.status not in ("ok", "error"):
        print(f"[sandbox: {r.status}]", file=sys.stderr)
        return 125
    return r.exit_code


def _bench(args) -> int:
    from rci_fast.sandbox import Sandbox
    from rci_fast.sandbox.bench import quick_report

    with Sandbox(workers=args.workers) as sb:
        report = quick_report(sb, args.n)
    print(f"{'snippet':<14}{'p50 ms':>9}{'p99 ms':>9}{'runs/s 1c':>11}{'runs/s 2c':>11}")
    for name in ("print(1)", "numpy+sympy"):
        r = report[name]
        print(f"{name:<14}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['runs_per_s_1_client']:>11.0f}"
              f"{r['runs_per_s_2_clients']:>11.0f}")
    print(f"idle worker private memory: {report['idle_worker_private_mb']:.1f} MiB "
          f"(template, shared by all workers: {report['template_private_mb']:.0f} MiB)")
    print(json.dumps(report))
    return 0


DEMO_PROGRAMS = [
    ("arithmetic", "print(sum(i * i for i in range(10)))"),
    ("sympy", "import sympy as sp\nx = sp.Symbol('x')\nprint(sp.factor(x**2 - 5*x + 6))"),
    ("exception", "print(1 / 0)"),
    ("infinite loop", "while True:\n    pass"),
    ("memory bomb", "x = bytearray(1 << 40)"),
    ("output flood", "while True:\n    print('spam' * 100)"),
    ("fork", "import os\nos.fork()"),
    ("network", "import socket\nsocket.create_connection(('127.0.0.1', 9))"),
    ("read /etc/shadow", "print(open('/etc/shadow').read())"),
    ("ptrace via ctypes", "import ctypes\nctypes.CDLL(None).syscall(101, 16, 0, 0, 0)"),
]


def _demo(args) -> int:
    from rci_fast.sandbox import Sandbox

    with Sandbox(workers=2) as sb:
        print(f"isolation: {sb.isolation}")
        results = sb.run_many([code for _, code in DEMO_PROGRAMS], timeout_s=2.0, memory_mb=256)
        print(f"{'program':<20}{'status':<14}{'ms':>8}  output")
        for (name, _), r in zip(DEMO_PROGRAMS, results):
            text = r.stdout.strip() or (r.stderr.strip().splitlines() or [""])[-1]
            if r.signal and (r.status == "violation" or not text):
                text = f"killed by {signal.Signals(r.signal).name}" + (" (blocked syscall)" if r.signal == signal.SIGSYS else "")
            print(f"{name:<20}{r.status:<14}{r.wall_ms:>8.1f}  {text[:60]!r}")
    return 0
