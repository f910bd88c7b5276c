"""Rollout benchmark: rci_fast's engine vs transformers.generate and vs a lockstep tool loop.

1. Plain decoding: 64 prompts of 32 tokens, 128 new tokens, sampling, EOS suppressed, on a tiny
   random Qwen2 (about 4.2M parameters). Tokens/s of rci_fast's engine and of
   `transformers.generate`, and the compute floor: the decode FLOPs at the matmul throughput this
   machine reaches on the same GEMM shapes (torch's or the decode step's own GEMM, whichever is
   faster; both rates are printed per shape), measured in the same run. On a CPU the engine's
   float32 decode steps run in C++ (model/cpu_decode.py); the same run with its Python step is
   timed too, to show what the C++ step brings.
2. Multi-turn with code: every sequence makes 3 code calls that sleep ~50 ms in the sandbox
   (the policy is scripted through a logits processor, identically on both sides). rci_fast's
   engine (code runs while others decode) vs a lockstep loop written the way TRL's tool loop
   works: generate the whole batch until every sequence stopped at a code block or EOS, execute
   all blocks one after another (as TRL's `_tool_call_loop` does), append the results, generate
   again with the grown prompts; and the same loop with a round's blocks run in parallel. On a GPU
   the engine decodes with CUDA graphs here, as the trainer does.
On a GPU (--device cuda) the same two scenarios run in bf16 on Qwen2.5-0.5B/1.5B-sized random
models (--size; their vocabulary is the benchmark tokenizer's 8192, not Qwen's 151936), and the
floor is the larger of the FLOPs at the bf16 matmul rate and the bytes every decode step must read
(all weights plus the KV cache) at the copy bandwidth, both measured in the same run.
Prints a table and a final JSON line.

    python bench/bench_rollout.py [--quick]
    python bench/bench_rollout.py --device cuda --size 0.5b
"""
from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import tempfile
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM

from rci_fast.model import load_pretrained, native
from rci_fast.rollout import RolloutEngine, SamplingParams
from rci_fast.rollout.engine import CODE_BLOCK
from rci_fast.sandbox import Sandbox
from rci_fast.tokenizer import train_bpe_tokenizer

CODE = "```python\nimport time\ntime.sleep(0.05)\nprint(6 * 7)\n```"


def corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Synthetic text rich enough for an 8k-token BPE vocabulary, plus the scripted turns."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
             for _ in range(20000)]
    lines = [" ".join(rng.choices(words, k=40)) for _ in range(n_lines)]
    return lines + [CODE, "Code Execution Results:\n42\n", "Let me compute this step by step.", "<<<42>>>"] * 50


# Model shapes: hidden, intermediate, layers, attention heads, key/value heads (Qwen2.5's for 0.5b/1.5b).
SIZES = {"tiny": (256, 704, 3, 4, 2), "0.5b": (896, 4864, 24, 14, 2), "1.5b": (1536, 8960, 28, 12, 2)}


def random_qwen2(vocab_size: int, path: str, size: str = "tiny") -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    hidden, inter, layers, heads, kv = SIZES[size]
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      tie_word_embeddings=True, eos_token_id=0)
    model = Qwen2ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    return model


def decode_flops(cfg, batch: int, prompt: int, new: int) -> float:
    """Matmul FLOPs of decoding `new` tokens for `batch` sequences (prefill included)."""
    h, kv = cfg.hidden_size, cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    per_token = 2 * cfg.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size)
    per_token += 2 * h * cfg.vocab_size  # lm head
    tokens = batch * (prompt + new)
    attn = sum(4 * cfg.num_hidden_layers * h * t for t in range(prompt + new)) * batch
    return per_token * tokens + attn


def gpu_floor_s(cfg, n_params: int, batch: int, prompt: int, new: int) -> dict:
    """GPU floor of a decode run: the FLOPs at the bf16 matmul rate, or the bytes each step must
    read (weights once, the batch's KV cache so far) at the copy bandwidth, whichever is larger."""
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    src = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB, well past L2
    dst = torch.empty_like(src)

    def best_s(fn, reps=10):
        fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return min(times)

    flops_per_s = 2 * 8192 ** 3 / best_s(lambda: a @ b)
    bytes_per_s = 2 * src.numel() * 2 / best_s(lambda: dst.copy_(src))  # read + write
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    read = sum(n_params * 2 + batch * (prompt + t) * kv_per_token for t in range(new))
    compute_s = decode_flops(cfg, batch, prompt, new) / flops_per_s
    memory_s = read / bytes_per_s
    return {"floor_s": max(compute_s, memory_s), "compute_s": compute_s, "memory_s": memory_s,
            "matmul_tflops": flops_per_s / 1e12, "copy_tb_s": bytes_per_s / 1e12}


def gemm_ways(a: torch.Tensor, b: torch.Tensor) -> dict:
    """Ways this machine computes a @ b, by name: torch's (MKL on a CPU) and, on a CPU where
    rci_fast's C++ kernels are built, the decode step's own GEMM on weights packed beforehand
    (small_gemm.cpp, faster at a few rows). A floor takes the fastest: the machine's, not torch's."""
    ways = {"torch": lambda: a @ b}
    if a.device.type == "cpu" and a.dtype == torch.float32 and native.available():
        packed = torch.ops.rci_fast_cpu.pack_panels(b)
        ways["small_gemm"] = lambda: torch.ops.rci_fast_cpu.small_gemm(a, packed, b.shape[1], None)
    return ways


def best_seconds(call, reps: int, device: str = "cpu", rounds: int = 3) -> float:
    """Seconds per call of `call`: after 3 warm-up calls, the best of `rounds` rounds of `reps`."""
    for _ in range(3):
        call()
    best = float("inf")
    for _ in range(rounds):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            call()
        sync(device)
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def gemm_seconds(m: int, k: int, n: int, device: str = "cpu", rounds: int = 3) -> dict:
    """Seconds per call of each way (gemm_ways) to multiply [m, k] by [k, n] in float32
    (best_seconds, rounds of enough calls for ~0.1 GFLOP, ~10 on a GPU)."""
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    reps = max(5, int((1e10 if device == "cuda" else 1e8) / (2 * m * k * n)))
    return {name: best_seconds(gemm, reps, device, rounds) for name, gemm in gemm_ways(a, b).items()}


def decode_gemm_rates(cfg, batch: int) -> list[dict]:
    """GFLOP/s of each way (gemm_ways) on each GEMM shape of a decode step (fp32, all threads)."""
    h = cfg.hidden_size
    shapes = [(batch, h, h), (batch, h, cfg.intermediate_size), (batch, cfg.intermediate_size, h),
              (batch, h, cfg.vocab_size)]
    return [{"shape": [m, k, n], **{name: 2 * m * k * n / s / 1e9 for name, s in gemm_seconds(m, k, n).items()}}
            for m, k, n in shapes]


def step_gemms_gflops(cfg, rows: int) -> float:
    """GFLOP/s of a decode step's GEMMs on `rows` rows run in sequence as a step runs them: each
    layer's fused q/k/v, o, fused gate/up and down projections with that layer's own weights, then
    the head, the fastest way (gemm_ways) for the whole sequence, best of 3 rounds. The model's
    weights (15-21 MB here) then stream through the caches as in a real step, where
    decode_gemm_rates reuses one hot weight per shape: the rate a step can actually reach."""
    h, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    q, kv, inter = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd, cfg.intermediate_size
    shapes = [(h, q + 2 * kv), (q, h), (h, 2 * inter), (inter, h)] * cfg.num_hidden_layers + [(h, cfg.vocab_size)]
    inputs = {k: torch.randn(rows, k) for k in {k for k, _ in shapes}}
    calls = [gemm_ways(inputs[k], torch.randn(k, n)) for k, n in shapes]
    flops = sum(2 * rows * k * n for k, n in shapes)
    best = min(best_seconds(lambda way=way: [c[way]() for c in calls], 10) for way in calls[0])
    return flops / best / 1e9


class ForceScript(LogitsProcessor):
    """transformers twin of the engine's scripted policy: row i emits its script, then pads."""

    def __init__(self, script_for_row):
        self.script_for_row = script_for_row

    def __call__(self, input_ids, scores):
        # Every row has the same length inside generate: no per-row read of input_ids (a GPU sync).
        out = torch.full_like(scores, float("-inf"))
        tokens = [self.script_for_row(row, input_ids.shape[1]) for row in range(scores.shape[0])]
        out[torch.arange(len(tokens), device=out.device), torch.tensor(tokens, device=out.device)] = 0.0
        return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def plain_decoding(tok, hf, ours, batch, prompt_len, new, device="cpu", seed=0, rounds=3) -> dict:
    """Tokens/s of each way to decode the same prompts, each its best of `rounds` timed runs taken
    in turn, and on a CPU the floor's GEMM rates measured after each round, each its best too (a
    VM's speed drifts by tens of percent, at times by half, within minutes: one run each could
    set a fast minute against a slow one)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(5, len(tok), (batch, prompt_len), generator=g)
    params = SamplingParams(temperature=1.0, max_new_tokens=new, stop_at_answer=False, seed=seed)
    warm_up = SamplingParams(max_new_tokens=4)
    engines = {"rci_fast": RolloutEngine(ours, tok, eos_ids=[], max_batch=batch)}
    engines["rci_fast"].generate(prompts[:2].tolist(), warm_up)
    if engines["rci_fast"].stats["cpu_decode"]:  # the same runs with the Python decode step it replaced
        engines["python_step"] = RolloutEngine(ours, tok, eos_ids=[], max_batch=batch, cpu_decode=False)
    if device == "cuda":  # the same runs with decode steps replayed as CUDA graphs
        # Each generate captures its own graphs (they hold its cache): the timing includes that.
        engines["graphs"] = RolloutEngine(ours, tok, eos_ids=[], max_batch=batch, cuda_graphs=True)
    for engine in list(engines.values())[1:]:
        engine.generate(prompts[:2].tolist(), warm_up)
    on_device = prompts.to(device)

    def hf_generate(ids, n):
        return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=True, temperature=1.0, top_k=0,
                           top_p=1.0, pad_token_id=0)

    hf_generate(on_device[:2], 4)
    ways = {name: (lambda e=e: e.generate(prompts.tolist(), params)) for name, e in engines.items()}
    ways["transformers"] = lambda: hf_generate(on_device, new)
    cfg = hf.config
    assert rounds >= 1
    seconds, outputs, cpu_rates = {name: float("inf") for name in ways}, {}, []
    for r in range(rounds):
        names = list(ways)
        for name in names[r % len(names):] + names[:r % len(names)]:  # each way first in some round
            sync(device)
            t0 = time.perf_counter()
            outputs[name] = ways[name]()
            sync(device)
            seconds[name] = min(seconds[name], time.perf_counter() - t0)
        if device == "cpu":  # the floor's GEMM rates between the runs: in the same minutes as they
            cpu_rates.append((decode_gemm_rates(cfg, batch), step_gemms_gflops(cfg, batch)))
    trajs, out = outputs["rci_fast"], outputs["transformers"]
    assert all(len(t.token_ids) == prompt_len + new for t in trajs)
    assert out.shape == (batch, prompt_len + new)
    if "graphs" in outputs:
        same = sum(a.token_ids == b.token_ids for a, b in zip(trajs, outputs["graphs"]))
        # In bf16 the graphs' padded key length sums attention in another order than the eager
        # step: a near-flat distribution (a random model's) then samples another token sooner or
        # later. How many new tokens agree before the first difference says which.
        agree = [next((i for i, (x, y) in enumerate(zip(a.token_ids[prompt_len:], b.token_ids[prompt_len:]))
                       if x != y), new) for a, b in zip(trajs, outputs["graphs"])]
        print(f"CUDA graphs: {same}/{batch} sequences identical to the eager engine's (sampled, same seed); "
              f"new tokens equal before the first difference: mean {sum(agree) / batch:.1f}, min {min(agree)}")
    ours_s, hf_s = seconds["rci_fast"], seconds["transformers"]
    python_step_s, graphs_s = seconds.get("python_step"), seconds.get("graphs")
    if device == "cuda":
        floor = gpu_floor_s(cfg, sum(p.numel() for p in hf.parameters()), batch, prompt_len, new)
    else:  # each shape's and way's best rate over the rounds
        rates = [{key: row[key] if key == "shape" else max(r[i][key] for r, _ in cpu_rates) for key in row}
                 for i, row in enumerate(cpu_rates[0][0])]
        best = max(r for row in rates for name, r in row.items() if name != "shape")
        flops, in_sequence = decode_flops(cfg, batch, prompt_len, new), max(r for _, r in cpu_rates)
        floor = {"floor_s": flops / (best * 1e9), "gemm_gflops": best, "gemm_rates": rates,
                 "step_gemms_gflops": in_sequence, "in_sequence_floor_s": flops / (in_sequence * 1e9)}
    tokens = batch * new
    result = {"tokens": tokens, "rci_fast_tok_s": tokens / ours_s, "transformers_tok_s": tokens / hf_s,
              "floor_tok_s": tokens / floor["floor_s"], "speedup_vs_transformers": hf_s / ours_s,
              "rci_fast_vs_floor": ours_s / floor["floor_s"], "floor": floor}
    if "in_sequence_floor_s" in floor:
        result["rci_fast_vs_in_sequence_floor"] = ours_s / floor["in_sequence_floor_s"]
    if python_step_s is not None:
        result.update(python_step_tok_s=tokens / python_step_s, cpp_step_speedup=python_step_s / ours_s)
    if graphs_s is not None:
        result.update(graphs_tok_s=tokens / graphs_s, graphs_speedup_vs_transformers=hf_s / graphs_s,
                      graphs_vs_floor=graphs_s / floor["floor_s"])
    return result


def with_code(tok, hf, ours, sandbox, batch, max_think, calls, device="cpu", seed=0,
              delay_steps=(4, 8)) -> dict:
    """Each sequence: `calls` x (some text, then the code block), then the answer. The text
    before each block has a random length in [4, max_think] tokens, as a model's would; the same
    scripts drive both sides. The engine also runs with each of `delay_steps` as its
    result_delay_steps (results rejoin a fixed number of steps after their block: repeatable
    runs), to show what repeatability costs."""
    rng = random.Random(seed)
    think = tok.encode("Let me compute this step by step.")
    think = think * (max_think // len(think) + 1)
    code, answer = tok.encode(CODE), tok.encode("<<<42>>>")
    scripts = [[think[:rng.randint(4, max_think)] + code for _ in range(calls)] + [answer]
               for _ in range(batch)]
    base = tok.encode("Let me compute")
    prompts = [[5 + row] + base for row in range(batch)]  # the first token tells the row

    def engine_force(segments_per_row, logits):
        tokens = []
        for segments in segments_per_row:
            row = segments[0].ids[0] - 5
            model = [s for s in segments if s.kind == "model"]
            n_turn = len(model) - 1 if model and segments[-1].kind == "model" else len(model)
            done = len(model[n_turn].ids) if n_turn < len(model) else 0
            script = scripts[row][min(n_turn, calls)]
            tokens.append(script[done] if done < len(script) else 0)
        out = torch.full_like(logits, float("-inf"))
        out[torch.arange(len(tokens), device=out.device), torch.tensor(tokens, device=out.device)] = 0.0
        return out

    # Greedy on both sides (the script decides every token anyway).
    params = SamplingParams(temperature=0, max_new_tokens=(calls + 1) * (max_think + len(code)) + 16)

    def run_engine(delay: int):
        # On a GPU with CUDA graphs, as the trainer decodes there (rollout.cuda_graphs).
        engine = RolloutEngine(ours, tok, sandbox, max_batch=batch, logits_processor=engine_force,
                               eos_ids=[0], result_delay_steps=delay, cuda_graphs=device == "cuda")
        t0 = time.perf_counter()
        trajs = engine.generate(prompts, params)
        seconds = time.perf_counter() - t0
        assert all(t.code_statuses == ["ok"] * calls for t in trajs), trajs[0].code_statuses
        return engine, trajs, seconds

    engine, trajs, ours_s = run_engine(0)
    tool_wait = engine.stats["tool_wait_s"]
    code_ms = sum(ms for t in trajs for ms in t.code_wall_ms)
    generated = sum(sum(len(s.ids) for s in t.segments if s.kind == "model") for t in trajs)
    delayed = {}
    for delay in delay_steps:
        delayed_engine, delayed_trajs, seconds = run_engine(delay)
        # The script decides every token, so the schedule must not change any trajectory.
        assert [t.token_ids for t in delayed_trajs] == [t.token_ids for t in trajs]
        delayed[delay] = {"tok_s": generated / seconds, "vs_as_they_arrive": ours_s / seconds,
                          "stalled_on_code_s": delayed_engine.stats["tool_wait_s"]}

    def lockstep(run_tools) -> float:
        """One transformers.generate per round for the whole batch, which runs until the longest
        row reaches its code block (shorter rows pad), then all blocks run, then again with the
        grown prompts (the whole history prefilled anew). Returns seconds."""
        rows = [list(p) for p in prompts]
        t0 = time.perf_counter()
        for round_ in range(calls + 1):
            round_scripts = [scripts[r][round_] for r in range(batch)]
            max_len = max(len(r) for r in rows)
            ids = torch.tensor([[0] * (max_len - len(r)) + r for r in rows])  # left padding
            mask = (torch.arange(max_len) >= torch.tensor([max_len - len(r) for r in rows])[:, None]).long()
            ids, mask = ids.to(device), mask.to(device)
            proc = ForceScript(lambda row, length, m=max_len: round_scripts[row][length - m]
                               if length - m < len(round_scripts[row]) else 0)
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=max(map(len, round_scripts)),
                              do_sample=False, logits_processor=LogitsProcessorList([proc]),
                              pad_token_id=0, eos_token_id=None)
            new = [o[max_len:max_len + len(s)] for o, s in zip(out.tolist(), round_scripts)]
            if round_ == calls:
                break
            results = run_tools([CODE_BLOCK.search(tok.decode(n)).group(1) for n in new])
            assert all(r.status == "ok" for r in results), [r for r in results if r.status != "ok"][:1]
            for r, n, res in zip(rows, new, results):
                r += n + tok.encode(engine.format_tool_output(res), add_special_tokens=False)
        return time.perf_counter() - t0

    # TRL's _tool_call_loop runs each row's tools one after another; a lockstep loop that sends a
    # round's calls to the sandbox together is a stronger rival: both are timed.
    serial_s = lockstep(lambda codes: [sandbox.run(c, timeout_s=10) for c in codes])
    parallel_s = lockstep(lambda codes: sandbox.run_many(codes, timeout_s=10))
    return {"sequences": batch, "calls_per_sequence": calls, "generated_tokens": generated,
            "rci_fast_tok_s": generated / ours_s, "lockstep_serial_tools_tok_s": generated / serial_s,
            "speedup_vs_lockstep_serial_tools": serial_s / ours_s,
            "lockstep_parallel_tools_tok_s": generated / parallel_s,
            "speedup_vs_lockstep_parallel_tools": parallel_s / ours_s,
            "code_exec_s_total": code_ms / 1e3, "engine_stalled_on_code_s": tool_wait,
            "code_time_hidden_fraction": 1 - tool_wait / (code_ms / 1e3),
            "repeatable": {f"result_delay_steps={d}": r for d, r in delayed.items()}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller batch (a smoke run)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--size", choices=list(SIZES), default="tiny",
                        help="model shape (default tiny: 4.3M parameters; 0.5b/1.5b are GPU sizes)")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    tok = train_bpe_tokenizer(corpus(), vocab_size=8192)
    path = tempfile.mkdtemp(prefix="rci-bench-")
    hf = random_qwen2(len(tok), path, args.size).to(args.device, dtype)
    ours = load_pretrained(path, dtype=dtype, device=args.device)
    n_params = sum(p.numel() for p in ours.parameters())
    batch, new = (16, 32) if args.quick else (64, 128)
    plain = plain_decoding(tok, hf, ours, batch, 32, new, args.device, rounds=1 if args.quick else 3)
    print(f"plain decoding: {json.dumps(plain)}", flush=True)  # kept if the code scenario fails
    with Sandbox(workers=8) as sb:  # the calls sleep: more workers than cores is right
        code = with_code(tok, hf, ours, sb, 8 if args.quick else 32, 64, 3, args.device)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    result = {"device": args.device, "where": where, "size": args.size, "dtype": str(dtype),
              "threads": torch.get_num_threads(), "params": n_params, "plain": plain, "with_code": code}
    print(f"random Qwen2 ({args.size}), {n_params / 1e6:.1f}M parameters, {str(dtype)[6:]}, {where}")
    print(f"plain decoding ({batch} x 32 prompt tokens, {new} new, sampled):")
    print(f"  rci_fast {plain['rci_fast_tok_s']:8.0f} tok/s   transformers {plain['transformers_tok_s']:8.0f} tok/s"
          f"   floor {plain['floor_tok_s']:8.0f} tok/s")
    print(f"  {plain['speedup_vs_transformers']:.2f}x transformers; {plain['rci_fast_vs_floor']:.2f}x the floor's time")
    if "python_step_tok_s" in plain:
        print(f"  rci_fast with the Python decode step instead of the C++ one {plain['python_step_tok_s']:8.0f} tok/s "
              f"(the C++ step: {plain['cpp_step_speedup']:.2f}x)")
    if "graphs_tok_s" in plain:
        print(f"  with CUDA graphs: {plain['graphs_tok_s']:8.0f} tok/s, {plain['graphs_speedup_vs_transformers']:.2f}x "
              f"transformers, {plain['graphs_vs_floor']:.1f}x the floor's time")
    for row in plain["floor"].get("gemm_rates", []):
        m, k, n = row["shape"]
        print(f"  decode GEMM {m} x {k} x {n}: torch {row['torch']:6.1f} GFLOP/s" + (
            f", rci_fast's small_gemm {row['small_gemm']:6.1f} ({row['small_gemm'] / row['torch']:.2f}x)"
            if "small_gemm" in row else ""))
    if "step_gemms_gflops" in plain["floor"]:
        print(f"  a step's GEMMs in sequence (the model's weights streaming through the caches, not one hot "
              f"weight per shape): {plain['floor']['step_gemms_gflops']:.1f} GFLOP/s; at that rate the floor is "
              f"{plain['tokens'] / plain['floor']['in_sequence_floor_s']:.0f} tok/s and rci_fast "
              f"{plain['rci_fast_vs_in_sequence_floor']:.2f}x its time")
    if "memory_s" in plain["floor"]:
        f = plain["floor"]
        print(f"  floor: compute {f['compute_s'] * 1e3:.1f} ms at {f['matmul_tflops']:.0f} TFLOP/s, memory "
              f"{f['memory_s'] * 1e3:.1f} ms at {f['copy_tb_s']:.2f} TB/s; the run took "
              f"{plain['tokens'] / plain['rci_fast_tok_s'] * 1e3:.0f} ms")
    print(f"with code ({code['sequences']} sequences x {code['calls_per_sequence']} calls of ~50 ms):")
    print(f"  rci_fast {code['rci_fast_tok_s']:8.0f} tok/s; {100 * code['code_time_hidden_fraction']:.0f}% of code time hidden")
    for name, r in code["repeatable"].items():
        print(f"  rci_fast, repeatable schedule ({name}) {r['tok_s']:8.0f} tok/s: "
              f"{r['vs_as_they_arrive']:.2f}x results fed back as they arrive")
    print(f"  lockstep, tools one after another (TRL's loop) {code['lockstep_serial_tools_tok_s']:8.0f} tok/s: "
          f"rci_fast {code['speedup_vs_lockstep_serial_tools']:.2f}x")
    print(f"  lockstep, a round's tools in parallel {code['lockstep_parallel_tools_tok_s']:8.0f} tok/s: "
          f"rci_fast {code['speedup_vs_lockstep_parallel_tools']:.2f}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
