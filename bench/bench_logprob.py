"""Log-probs of target tokens from hidden states: forward + backward time and peak extra memory.

    python bench/bench_logprob.py            # CPU part always; GPU part when CUDA is available
    python bench/bench_logprob.py --quick    # small shapes, a smoke run
    python bench/bench_logprob.py --gpu-only # skip the CPU part (a GPU lease is short)

Methods (each measured in its own process, so one method's freed memory cannot hide another's peak):
  naive      log_softmax(hidden @ W.T).gather(targets)
  trl_rows   full logits, then TRL's selective_log_softmax (fp32 branch: logsumexp in a loop over
             the batch rows of a [B, L, V] view, B = 8 sequences)
  rci_torch  fused_linear_logprob(backend="torch"): chunked, logits never whole
  rci_triton fused_linear_logprob(backend="triton")                     (GPU only)
  liger      Liger-Kernel's LigerFusedLinearCrossEntropyLoss, if it is installed (GPU only; it returns
             a reduced loss, not per-token log-probs, and forms its gradient in the forward: 6THV)
  loss_*     rci_fast's GRPO loss from hidden states (linear_policy_loss), torch or Triton rows:
             2pass = log-probs, then the backward recomputes the logits (8THV); 1pass = the
             gradient formed in the forward, one chunk over the whole vocabulary at a time (6THV)
All count 8*T*H*V FLOPs for forward + backward (logits 2THV; backward recompute 2THV + dH 2THV +
dW 2THV): "floor" is that count over the machine's measured matmul rate; naive paths, Liger and the
one-pass loss do 6THV, so they may beat the floor's time without being faster per useful FLOP.
Peak extra memory: CPU, the process's peak resident set (VmHWM, reset before the run) minus its
resident set after the inputs exist; GPU, max_memory_allocated minus the inputs. Both include the
gradients dH and dW, which every method must return; "work" is the peak without them.
The last line printed is one JSON object with every figure.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

CPU_SHAPE = dict(T=2048, H=896, V=151936)      # Qwen2.5-0.5B lm_head
GPU_SHAPES = [dict(T=4096, H=3584, V=152064), dict(T=16384, H=3584, V=152064)]  # Qwen2.5-7B
TRL_BATCH_ROWS = 8


# ---------------------------------------------------------------------------------------- methods
def naive(hidden, weight, targets):
    return torch.log_softmax((hidden @ weight.t()).float(), dim=-1).gather(1, targets[:, None]).squeeze(1)


def trl_rows(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    logits = logits.view(TRL_BATCH_ROWS, -1, logits.shape[-1])
    index = targets.view(TRL_BATCH_ROWS, -1)
    selected = torch.gather(logits, dim=-1, index=index.unsqueeze(-1)).squeeze(-1)
    logsumexp = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])  # TRL's row loop
    return (selected - logsumexp).view(-1)


def rci(backend):
    from rci_fast.kernels import fused_linear_logprob
    return lambda hidden, weight, targets: fused_linear_logprob(hidden, weight, targets, backend=backend)


def rci_loss(backend, one_pass):
    """The GRPO loss on top (linear_policy_loss), two-pass (logp, then backward) or one pass."""
    from rci_fast.kernels import linear_policy_loss

    def fn(hidden, weight, targets):
        T, V = targets.shape[0], weight.shape[0]
        gen = torch.Generator(device=targets.device).manual_seed(1)
        old = torch.full((T,), -float(torch.log(torch.tensor(V))), device=targets.device)
        adv = torch.randn(T, generator=gen, device=targets.device)
        mask = torch.ones(T, dtype=torch.bool, device=targets.device)
        return linear_policy_loss(hidden, weight, targets, old, adv, mask, backend=backend,
                                  one_pass=one_pass)[0]
    return fn


def liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    return lambda hidden, weight, targets: loss_fn(weight, hidden, targets)


def get_method(name):
    return {"naive": naive, "trl_rows": trl_rows}.get(name) or {
        "rci_torch": lambda: rci("torch"), "rci_triton": lambda: rci("triton"), "liger": liger,
        "loss_torch_2pass": lambda: rci_loss("torch", False), "loss_torch_1pass": lambda: rci_loss("torch", True),
        "loss_triton_2pass": lambda: rci_loss("triton", False),
        "loss_triton_1pass": lambda: rci_loss("triton", True)}[name]()


# ------------------------------------------------------------------------------------ measurement
def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak resident set to the current one
        f.write("5")


def make_inputs(T, H, V, device, dtype):
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(T, H, generator=gen, device=device, dtype=dtype).requires_grad_()
    weight = torch.randn(V, H, generator=gen, device=device, dtype=dtype).mul_(H ** -0.5).requires_grad_()
    targets = torch.randint(0, V, (T,), generator=gen, device=device)
    return hidden, weight, targets


def step(fn, hidden, weight, targets):
    hidden.grad = weight.grad = None
    fn(hidden, weight, targets).sum().backward()


def worker(method, T, H, V, device, dtype, repeats, mm_rows):
    """Runs in a child process: one method, peak memory of the first step, then timed steps."""
    dtype = getattr(torch, dtype)
    fn = get_method(method)
    hidden, weight, targets = make_inputs(T, H, V, device, dtype)
    grad_bytes = (hidden.numel() + weight.numel()) * hidden.element_size()
    if device == "cuda":
        step(fn, hidden, weight, targets)  # warm-up: Triton compiles, cuBLAS picks its kernels
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step(fn, hidden, weight, targets)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        # Warm-up on small inputs first: the first call pages in library code and thread pools
        # (~100 MiB of resident set), which is no method's working memory.
        step(fn, *make_inputs(min(T, 64), H, min(V, 8192), device, dtype))
        base_kib = _status_kib("VmRSS")
        _reset_peak_rss()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step(fn, hidden, weight, targets)
            times.append(time.perf_counter() - t0)
        peak = (_status_kib("VmHWM") - base_kib) * 1024
    # The matmul rate again, in this process right after the steps: on a shared machine the rate
    # moves between processes, and a step is only comparable with the rate of its own moment.
    del hidden, weight, targets
    local_rate = matmul_rate(mm_rows, H, V, device, str(dtype).replace("torch.", ""), repeats=3)
    return dict(method=method, T=T, H=H, V=V, dtype=str(dtype).replace("torch.", ""), device=device,
                times_s=times, best_s=min(times), peak_extra_bytes=peak, grad_bytes=grad_bytes,
                local_matmul_flops_per_s=local_rate["flops_per_s"])


def matmul_rate(M, K, N, device, dtype, repeats=5):
    """Best FLOP/s of an [M, K] @ [K, N] matmul: the rate the 8THV floor is measured against."""
    dtype = getattr(torch, dtype)
    a = torch.randn(M, K, device=device, dtype=dtype)
    b = torch.randn(K, N, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # +1: the first call pays for set-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return dict(method="matmul", M=M, K=K, N=N, best_s=best, flops_per_s=2 * M * K * N / best)


def in_child(args):
    """Run one measurement in a fresh interpreter; return its JSON result (or the error)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return dict(method=args.get("method"), error=(out.stderr.strip().splitlines() or ["failed"])[-1])
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------- reports
def run_suite(methods, shape, device, dtype, repeats, mm_rows):
    rate = in_child(dict(kind="matmul", M=mm_rows, K=shape["H"], N=shape["V"], device=device, dtype=dtype))
    flops = 8 * shape["T"] * shape["H"] * shape["V"]
    floor_s = flops / rate["flops_per_s"] if "flops_per_s" in rate else None
    rows = []
    for m in methods:
        r = in_child(dict(kind="method", method=m, device=device, dtype=dtype, repeats=repeats,
                          mm_rows=mm_rows, **shape))
        if "error" not in r:
            r["tflops_8thv"] = flops / r["best_s"] / 1e12
            r["floor_fraction"] = floor_s / r["best_s"] if floor_s else None
            r["local_floor_fraction"] = flops / r["local_matmul_flops_per_s"] / r["best_s"]
            r["work_bytes"] = r["peak_extra_bytes"] - r["grad_bytes"]
        rows.append(r)
    naive_row = next((r for r in rows if r["method"] == "naive" and "error" not in r), None)
    for r in rows:
        if naive_row and "error" not in r:
            r["peak_vs_naive"] = r["peak_extra_bytes"] / naive_row["peak_extra_bytes"]
            r["work_vs_naive"] = r["work_bytes"] / naive_row["work_bytes"]
    return dict(device=device, dtype=dtype, shape=shape, matmul=rate, floor_s=floor_s, flops=flops, rows=rows)


def print_table(title, suite):
    s, mib = suite["shape"], 2 ** 20
    print(f"\n{title}: T={s['T']} H={s['H']} V={s['V']} {suite['dtype']}, forward + backward")
    mm = suite["matmul"]
    if "flops_per_s" in mm:
        print(f"matmul rate measured here ({mm['M']}x{mm['K']} @ {mm['K']}x{mm['N']}): "
              f"{mm['flops_per_s'] / 1e9:.1f} GFLOP/s -> 8*T*H*V floor {suite['floor_s']:.3f} s")
    print("'of floor': the floor over the step time; 'local': the same with the matmul rate measured in the")
    print("method's own process just after its steps (differs from the first when the machine is shared)")
    print(f"{'method':<17} {'best s':>8} {'TFLOP/s':>8} {'of floor':>9} {'local':>7} {'peak MiB':>9} {'vs naive':>9} "
          f"{'work MiB':>9} {'vs naive':>9}")
    for r in suite["rows"]:
        if "error" in r:
            print(f"{r['method']:<17} error: {r['error']}")
            continue
        frac = f"{r['floor_fraction']:.0%}" if r.get("floor_fraction") else "-"
        print(f"{r['method']:<17} {r['best_s']:>8.3f} {r['tflops_8thv']:>8.3f} {frac:>9} "
              f"{r['local_floor_fraction']:>7.0%} "
              f"{r['peak_extra_bytes'] / mib:>9.0f} {r.get('peak_vs_naive', 0):>9.1%} "
              f"{r['work_bytes'] / mib:>9.0f} {r.get('work_vs_naive', 0):>9.1%}")


def pick(methods, args):
    return [m for m in methods if m in args.methods.split(",")] if args.methods else methods


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes: a smoke run in seconds")
    p.add_argument("--repeats", type=int, default=2, help="timed forward+backward steps per method")
    p.add_argument("--gpu-only", action="store_true", help="skip the CPU part")
    p.add_argument("--methods", help="comma-separated subset of the methods (default: all of the device's)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        job = json.loads(args.child)
        if job.pop("kind") == "matmul":
            print(json.dumps(matmul_rate(**job)))
        else:
            print(json.dumps(worker(**job)))
        return

    result = {"bench": "logprob", "torch": torch.__version__, "threads": torch.get_num_threads()}
    result["cpu"] = None
    if not args.gpu_only:
        cpu_shape = dict(T=256, H=128, V=32000) if args.quick else CPU_SHAPE
        cpu = run_suite(pick(["naive", "trl_rows", "rci_torch", "loss_torch_2pass", "loss_torch_1pass"], args),
                        cpu_shape, "cpu", "float32", args.repeats, mm_rows=min(512, cpu_shape["T"]))
        print_table(f"CPU ({torch.get_num_threads()} threads)", cpu)
        result["cpu"] = cpu

    if torch.cuda.is_available():
        result["gpu_name"] = torch.cuda.get_device_name()
        result["gpu"] = []
        for shape in ([dict(T=1024, H=512, V=32000)] if args.quick else GPU_SHAPES):
            suite = run_suite(pick(["naive", "trl_rows", "rci_torch", "rci_triton", "liger", "loss_triton_2pass",
                                    "loss_triton_1pass"], args), shape, "cuda", "bfloat16", max(args.repeats, 5),
                              mm_rows=4096)
            print_table(f"GPU {result['gpu_name']}", suite)
            result["gpu"].append(suite)
    else:
        print("\nGPU part skipped: no CUDA device here.")
        result["gpu"] = None
    print(json.dumps(result))


if __name__ == "__main__":
    main()
