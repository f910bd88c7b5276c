"""One training step, rci_fast vs a plain transformers loop, on packed batches: the time per step,
what a batch shape seen for the first time costs, and where the time goes.

On a GPU a small model runs launch-bound, and there rci_fast's SFT step was 0.44x a plain
transformers loop while its trainer's steps jumped between 0.3 and 1.2 s (H100, bench/RESULTS.md).
This benchmark separates the two. Both sides get the same random Qwen2 (bench_vs_trl's: hidden 256,
4 layers, untied head, vocabulary 2048) and the same packed micro-batches (random lengths, position
ids restarting per sequence; transformers gets a block-diagonal causal mask): forward, backward,
grad clip 1.0 and fused AdamW. rci_fast runs as its trainer does: `load_sharded` (fp32 masters,
the compute dtype from --dtype) and `sft.forward_backward`; transformers in fp32, under autocast for
bf16.

1. Shapes: K batch shapes (lists of sequence lengths), each run R times in turn (s0 s1 s2 s0 s1
   ...), after one untimed step on another shape: the first step at each shape against the later
   ones. A cost per new shape (planning, compiling) shows as first >> repeat.
2. Where the time goes: operators dispatched per step (views left out: on a GPU roughly one
   kernel launch each), and the profiler's top operators by self time (device time on a GPU) over
   the repeated steps.
Prints a table and a final JSON line.

    python bench/bench_train_step.py [--quick] [--device cuda] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import corpus, sync  # noqa: E402
from bench_vs_trl import build_model, transformers_packed_inputs  # noqa: E402  (the end-to-end comparison's model)

from rci_fast.train import init_distributed  # noqa: E402
from rci_fast.train.data import TokenizedSequence, pack  # noqa: E402
from rci_fast.train.parallelize import load_sharded  # noqa: E402
from rci_fast.train.sft import clip_grad_norm, forward_backward  # noqa: E402

# Ops that make no kernel on a GPU (metadata only), left out of the per-step count.
VIEWS = {"view", "_unsafe_view", "transpose", "t", "slice", "select", "unsqueeze", "squeeze", "expand",
         "detach", "alias", "as_strided", "split", "split_with_sizes", "permute", "lift_fresh", "_reshape_alias"}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def random_shapes(k: int, seqs: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randint(lo, hi) for _ in range(seqs)] for _ in range(k)]


def batch_of(lengths: list[int], vocab: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    sequences = []
    for n in lengths:
        trainable = torch.zeros(n, dtype=torch.bool)
        trainable[n // 3:] = True  # a prompt, then the trained answer
        sequences.append(TokenizedSequence(torch.randint(0, vocab, (n,), generator=g), trainable))
    return pack(sequences)


class RciFastStep:
    name = "rci_fast"

    def __init__(self, path: str, dist_info, dtype: torch.dtype):
        self.model = load_sharded(path, dist_info, dtype)
        self.model.train()
        self.device = dist_info.device
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)

    def __call__(self, mb) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        forward_backward(self.model, [mb], self.device)
        clip_grad_norm(self.model.parameters(), 1.0)
        self.optimizer.step()


class TransformersStep:
    name = "transformers"

    def __init__(self, path: str, device: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
        self.model.train()
        self.device, self.dtype = device, dtype
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)

    def __call__(self, mb) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        inputs = transformers_packed_inputs(mb, self.device)
        with torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype != torch.float32):
            loss = self.model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)
        self.optimizer.step()


def time_shapes(step, batches: list, order: list[int], device: str) -> dict:
    """Seconds of each step in `order` (indices into batches); first sight of a shape vs repeats."""
    seen, first, repeat = set(), [], []
    for i in order:
        sync(device)
        t0 = time.perf_counter()
        step(batches[i])
        sync(device)
        (repeat if i in seen else first).append(time.perf_counter() - t0)
        seen.add(i)
    return {"first_s": statistics.median(first), "repeat_s": statistics.median(repeat),
            "first_each_s": first, "repeat_each_s": repeat}


def where_time_goes(step, batches: list, device: str, top: int) -> dict:
    """Operators per step (views left out) and the profiler's top operators over one pass."""
    with OpCounter() as counter:
        step(batches[0])
    ops = {k: v for k, v in counter.ops.items() if k not in VIEWS}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for mb in batches:
            step(mb)
        sync(device)
    events = prof.key_averages()
    on_device = device == "cuda"
    key = "self_device_time_total" if on_device else "self_cpu_time_total"
    ranked = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)
    total = sum(getattr(e, key, 0.0) for e in events) or 1.0
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    return {"ops_per_step": sum(ops.values()), "top_ops_dispatched": collections.Counter(ops).most_common(8),
            "launches_per_step": launches / len(batches) if on_device else None,
            "time_kind": "device" if on_device else "cpu",
            "top": [(e.key, getattr(e, key, 0.0) / 1e3 / len(batches), getattr(e, key, 0.0) / total)
                    for e in ranked[:top]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small batches, few repeats (a smoke run)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="compute dtype (masters stay fp32 on both sides)")
    parser.add_argument("--shapes", type=int, default=3, help="distinct batch shapes (K)")
    parser.add_argument("--repeats", type=int, default=None, help="steps per shape (R; default 4, quick 2)")
    parser.add_argument("--top", type=int, default=12, help="operators listed per side")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_train_step: --device cuda, but CUDA is not available", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    repeats = args.repeats or (2 if args.quick else 4)
    seqs, lo, hi = (4, 40, 120) if args.quick else (16, 150, 350)

    path = tempfile.mkdtemp(prefix="rci-train-step-")
    built = build_model(Path(path), corpus())
    vocab = len(built["tokenizer"])
    shapes = random_shapes(args.shapes + 1, seqs, lo, hi)  # the last one: the untimed warm-up
    batches = [batch_of(lengths, vocab, seed) for seed, lengths in enumerate(shapes)]
    order = [k for _ in range(repeats) for k in range(args.shapes)]
    dist_info = init_distributed(args.device)
    result = {"device": args.device, "where": torch.cuda.get_device_name() if args.device == "cuda"
              else f"{torch.get_num_threads()} threads", "dtype": args.dtype, "params": built["params"],
              "sequences_per_step": seqs, "tokens_per_step": [b.num_tokens for b in batches[:args.shapes]],
              "shapes": args.shapes, "repeats": repeats, "torch": torch.__version__}
    try:
        for step in (RciFastStep(path, dist_info, dtype), TransformersStep(path, args.device, dtype)):
            step(batches[-1])  # one-time costs (allocator, kernels' first compile) on another shape
            timing = time_shapes(step, batches, order, args.device)
            result[step.name] = {**timing, **where_time_goes(step, batches[:args.shapes], args.device, args.top)}
    finally:
        dist_info.close()
    ours, theirs = result["rci_fast"], result["transformers"]
    result["speedup_repeat"] = theirs["repeat_s"] / ours["repeat_s"]
    result["first_over_repeat"] = {"rci_fast": ours["first_s"] / ours["repeat_s"],
                                   "transformers": theirs["first_s"] / theirs["repeat_s"]}
    report(result)
    print(json.dumps(result))
    return 0


def report(r: dict) -> None:
    print(f"random Qwen2, {r['params'] / 1e6:.1f}M parameters, {r['dtype']}, {r['where']}; "
          f"{r['sequences_per_step']} sequences per step, tokens per shape {r['tokens_per_step']}")
    print(f"{'':13} {'repeat ms':>9} {'first ms':>9} {'first/rep':>9} {'ops/step':>8} {'launches':>8}")
    for name in ("rci_fast", "transformers"):
        s = r[name]
        launches = f"{s['launches_per_step']:8.0f}" if s["launches_per_step"] is not None else f"{'-':>8}"
        print(f"{name:13} {s['repeat_s'] * 1e3:9.1f} {s['first_s'] * 1e3:9.1f} "
              f"{r['first_over_repeat'][name]:9.2f} {s['ops_per_step']:8d} {launches}")
    print(f"rci_fast's step is {r['speedup_repeat']:.2f}x the transformers loop's speed (repeated shapes)")
    for name in ("rci_fast", "transformers"):
        s = r[name]
        print(f"\n{name}: top operators by {s['time_kind']} self time (ms per step, share)")
        for key, ms, share in s["top"]:
            print(f"  {key[:60]:60} {ms:8.2f} {100 * share:5.1f}%")


if __name__ == "__main__":
    sys.exit(main())
