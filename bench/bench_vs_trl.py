"""End to end: rci_fast vs TRL's GRPOTrainer (and vs a plain transformers SFT loop), one run.

Both sides get the same tiny random Qwen2 (about 4.2M parameters, untied LM head, fp32, CPU),
the same BPE tokenizer trained here on the task prompts, the same reasoning-gym prompts in the
same order (identical token ids), 4 prompts x group 4 = 16 completions of exactly 64 tokens per
step (EOS is masked out of sampling on both sides, as `min_new_tokens` does in transformers), the
same reward (rci_fast.tasks.compute_reward), AdamW (fused) at lr 1e-6, constant schedule, grad
clip 1.0, token-mean loss, GRPO advantages, no KL term (beta = kl_coef = 0: no reference model on
either side), no activation checkpointing, temperature 1, top-p 1.

1. GRPO step: seconds per step (median of the timed steps, warm-up excluded), split into rollout
   (generation), update (forward, backward, optimizer) and the rest (rewards, packing, weight
   sync, bookkeeping), and tokens/s. TRL's split comes from timing its own `_generate` and
   `_generate_and_score_completions` methods inside its steps (TRL's profiling only reports to
   experiment trackers). Each side runs twice (ours, TRL, TRL, ours: a drift of the machine's
   speed during the run slows both alike); the medians pool both runs. The compute floor of the
   step: the generation FLOPs (prefill + decode, attention included) and the policy forward +
   backward (6 x matmul parameters x tokens + attention) at the fp32 matmul throughput this
   machine reaches on the step's own GEMM shapes, measured in the same run (decode GEMMs at
   M = 16 rows, update GEMMs at M = all tokens). That floor, as TRL computes the step, counts
   each completion's prompt; a second one counts each group's prompt once (rci_fast's engine
   prefills it once and its update forwards it once, train.share_prompts; --no-share-prompts
   forwards it with every completion, as TRL does).
2. SFT: tokens/s of rci_fast's SFTTrainer step vs a plain transformers loop
   (`AutoModelForCausalLM(input_ids, position_ids, attention_mask, labels)` + fused AdamW + grad
   clip) on the same packed micro-batches (sequences back to back, position ids restart per
   sequence, a block-diagonal causal mask keeps them apart), same tokens per step. The first step's loss of both sides is printed: equal losses show that both
   saw the same data and masks.
3. GRPO step with code calls: each completion makes `--calls` interpreter calls that run
   `time.sleep(--code-sleep-ms)` then print, then answers. The policy is scripted through a
   logits processor on both sides (identical think lengths per prompt and round): rci_fast's
   engine (```python blocks run in its sandbox while the other rows keep decoding) vs TRL's
   `tools=` loop (Qwen2.5 chat template with <tool_call> JSON, a `python(code)` tool that runs
   the code in the same rci_fast sandbox; TRL runs a row's tools one after another and then
   regenerates every row that called a tool, re-prefilling its whole history). Both sides get
   the same prompt ids: TRL's rendering, whose tool schema makes them ~3x longer.

On a GPU (--device cuda) the same three parts run there, in fp32 on both sides (TRL with bf16 off,
rci_fast with train.mixed_precision=fp32), rci_fast's decode steps replayed as CUDA graphs
(rollout.cuda_graphs, the trainer's default on a GPU); the floor's GEMM rates are then the GPU's
fp32 rates.

Prints a table and a final line `JSON {...}`.

    python bench/bench_vs_trl.py [--quick] [--threads N] [--device cuda] [--no-share-prompts]

Needs trl (`pip install -e .[bench]`); exits with status 2 when it is missing. Nothing is
downloaded: the model and tokenizer are built here, HF_HUB_OFFLINE=1.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import collections
import contextlib
import copy
import dataclasses
import json
import logging
import random
import statistics
import string
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from rci_fast.config import RLConfig, SFTConfig, load_config
from rci_fast.tasks import RewardConfig, build_messages, compute_reward, render_chat
from rci_fast.tokenizer import train_bpe_tokenizer
from rci_fast.train.rollouts import load_items, prompt_ids

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import gemm_seconds, step_gemms_gflops  # noqa: E402

TASKS = ["rg/basic_arithmetic", "rg/gcd", "rg/lcm", "rg/chain_sum"]
PROMPTS, GROUP, NEW_TOKENS, LR = 4, 4, 64, 1e-6


# ---- shared set-up -------------------------------------------------------------------------

def build_model(out_dir: Path, texts: list[str], vocab: int = 2048) -> dict:
    """Tokenizer trained on `texts` and a random Qwen2 (hidden 256, 4 layers, untied head) saved
    as an HF folder that transformers, TRL and rci_fast all load."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = train_bpe_tokenizer(texts, vocab_size=vocab)
    stop = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      eos_token_id=stop, bos_token_id=stop[1], pad_token_id=stop[1],
                      max_position_embeddings=4096, rope_theta=10000.0)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = stop
    model.generation_config.pad_token_id = stop[1]
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"tokenizer": tok, "config": cfg, "params": sum(p.numel() for p in model.parameters())}


def matmul_params(cfg) -> int:
    """Parameters that take part in a matmul per token: every Linear plus the LM head (the
    embedding is a lookup)."""
    h, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    return cfg.num_hidden_layers * (2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size) + h * cfg.vocab_size


def gemm_rate(cfg, m: int) -> float:
    """FLOP/s of the model's GEMM shapes with m rows (fp32, on DEVICE; this process's threads on a
    CPU); the FLOP-weighted rate over the shapes (total FLOPs / total time), each shape's time that
    of the fastest way to compute it (bench_rollout.gemm_seconds)."""
    h, hd = cfg.hidden_size, cfg.hidden_size // cfg.num_attention_heads
    kv, inter, v = cfg.num_key_value_heads * hd, cfg.intermediate_size, cfg.vocab_size
    shapes = [(m, h, h), (m, h, kv), (m, h, kv), (m, h, h), (m, h, inter), (m, h, inter), (m, inter, h), (m, h, v)]
    flops = sum(2 * mm * k * n for mm, k, n in shapes)
    return flops / sum(min(gemm_seconds(mm, k, n, DEVICE).values()) for mm, k, n in shapes)


def training_flops(cfg, lengths: list[int]) -> int:
    """FLOPs of a forward and backward over packed sequences of these lengths: every Linear and
    the head on every token, causal attention (q.k and p.v) within each sequence."""
    p, layers, h = matmul_params(cfg), cfg.num_hidden_layers, cfg.hidden_size
    return 6 * p * sum(lengths) + 3 * sum(2 * layers * h * n * n for n in lengths)


def grpo_floor(cfg, prompt_lens: list[int], new: int) -> dict:
    """FLOPs of one GRPO step without a reference model, and its time at the measured rates; the
    `shared_` figures count each group's prompt once (prefill, and the update's per-token layers:
    what the work needs when completions attend to one copy of their prompt)."""
    p, layers, h = matmul_params(cfg), cfg.num_hidden_layers, cfg.hidden_size
    rows = len(prompt_lens)
    prefill = sum(2 * p * n + 2 * layers * h * n * n for n in prompt_lens)  # attention: q.k and p.v, causal
    decode = sum(2 * p + 4 * layers * h * (n + t) for n in prompt_lens for t in range(new - 1))
    tokens = sum(n + new for n in prompt_lens)
    update = training_flops(cfg, [n + new for n in prompt_lens])
    rate_decode, rate_update = gemm_rate(cfg, rows), gemm_rate(cfg, tokens)
    floor_s = decode / rate_decode + (prefill + update) / rate_update
    group_prompts = prompt_lens[::GROUP]  # rows are prompts x GROUP, a group's rows together
    shared_prefill = sum(2 * p * n + 2 * layers * h * n * n for n in group_prompts)
    # Per-token layers on each prompt once; attention: a prompt's own once, each completion's
    # queries against its prompt and itself (causal).
    shared_update = (6 * p * (sum(group_prompts) + rows * new) + 3 * sum(2 * layers * h * n * n for n in group_prompts)
                     + 3 * sum(2 * layers * h * ((n + new) ** 2 - n * n) for n in prompt_lens))
    shared_floor_s = decode / rate_decode + (shared_prefill + shared_update) / rate_update
    # The decode GEMMs at the rate a step's GEMMs reach in sequence, the model's weights streaming
    # through the caches (bench_rollout.step_gemms_gflops; CPU), instead of one hot weight per shape.
    in_sequence = step_gemms_gflops(cfg, rows) * 1e9 if DEVICE == "cpu" else rate_decode
    return {"gflop_generation": (prefill + decode) / 1e9, "gflop_update": update / 1e9,
            "step_gemms_gflops_decode": in_sequence / 1e9,
            "floor_s_in_sequence": decode / in_sequence + (prefill + update) / rate_update,
            "gemm_gflops_decode_m16": rate_decode / 1e9, "gemm_gflops_update": rate_update / 1e9,
            "floor_s": floor_s, "floor_generation_s": decode / rate_decode + prefill / rate_update,
            "shared_floor_s": shared_floor_s, "gflop_shared_update": shared_update / 1e9,
            "gflop_shared_generation": (shared_prefill + decode) / 1e9,
            "floor_update_s": update / rate_update,
            "floor_s_single_best_rate": (prefill + decode + update) / max(rate_decode, rate_update)}


def sft_floor(cfg, batches, steps: range) -> dict:
    """FLOPs of the SFT steps `steps` (training_flops of their sequences) and their median time at
    the measured GEMM rate for the micro-batches' token count."""
    flops, tokens = [], []
    for step in steps:
        mbs = batches.micro_batches(*divmod(step, batches.steps_per_epoch))
        flops.append(training_flops(cfg, [n for mb in mbs for n in mb.cu_seqlens.diff().tolist()]))
        tokens.extend(mb.num_tokens for mb in mbs)
    rate = gemm_rate(cfg, int(median(tokens)))
    return {"gflop_per_step": median(flops) / 1e9, "gemm_gflops": rate / 1e9, "floor_s": median(flops) / rate}


def reward_of(items, config=RewardConfig()):
    """TRL reward function: rci_fast's reward of each completion (its assistant turns)."""
    def rci_fast_reward(prompts, completions, item, **kwargs):
        out = []
        for c, i in zip(completions, item):
            turns = [m["content"] for m in c if m["role"] == "assistant"] if isinstance(c, list) else [c]
            task, sample = items[i]
            out.append(compute_reward(task, sample, turns, config).total)
        return out
    return rci_fast_reward


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ---- rci_fast GRPO -------------------------------------------------------------------------

ONE_PASS_LOSS = False  # --one-pass-loss: rci_fast's update with algo.one_pass_loss
SHARE_PROMPTS = True  # --no-share-prompts: rci_fast's update with train.share_prompts false


def rci_fast_grpo(model_dir, out_dir, per_task, steps, warmup, *, new_tokens, code=None, workers=2,
                  prompts=None) -> dict:
    from rci_fast.train.grpo import GRPOTrainer

    overrides = {"out_dir": out_dir, "model.path": model_dir, "tasks.train": "[" + ",".join(TASKS) + "]",
                 "tasks.samples_per_task": per_task, "rollout.group_size": GROUP,
                 "rollout.prompts_per_step": PROMPTS, "rollout.temperature": 1.0, "rollout.top_p": 1.0,
                 "rollout.max_new_tokens": new_tokens, "rollout.max_total_tokens": 1024,
                 "rollout.max_batch": PROMPTS * GROUP, "rollout.sandbox_workers": workers,
                 "rollout.max_code_calls": 8, "algo.kl_coef": 0, "algo.advantage": "grpo",
                 "algo.aggregation": "token-mean", "train.steps": 10_000, "train.lr": LR,
                 "train.micro_batch_tokens": 16384, "train.schedule": "constant", "train.grad_clip": 1.0,
                 "train.weight_decay": 0.0, "curriculum.mode": "uniform", "checkpoint.export_at_end": False,
                 "algo.one_pass_loss": ONE_PASS_LOSS, "train.share_prompts": SHARE_PROMPTS,
                 "train.mixed_precision": "fp32"}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()], cls=RLConfig)
    from rci_fast.train import grpo as grpo_module

    trainer = GRPOTrainer(cfg, DIST)
    real_params = grpo_module.sampling_params
    if code is None:  # TRL does not stop at a <<<answer>>>: neither does rci_fast here (64 tokens each)
        grpo_module.sampling_params = lambda *a, **k: dataclasses.replace(real_params(*a, **k), stop_at_answer=False)
    try:
        n = len(trainer.items)
        if prompts is not None:  # given prompt ids (the trainer caches each item's prompt)
            trainer._prompts.update(enumerate(prompts))
        # The same prompts as TRL's unshuffled dataset: step s takes items 4s .. 4s+3.
        trainer.curriculum.draw = lambda step, k: np.arange(step * k, step * k + k) % n
        eos = sorted(trainer.engine.eos_ids)
        if code is None:  # 64 tokens exactly: EOS masked out, as min_new_tokens does in transformers
            def no_eos(segments, logits):
                logits[:, eos] = float("-inf")
                return logits
            trainer.engine.logits_processor = no_eos
        else:
            trainer.engine.logits_processor = code(trainer)
        rows = [trainer.train_step() for _ in range(warmup + steps)][warmup:]
    finally:
        grpo_module.sampling_params = real_params
        trainer.close()
    parts = {"step": [r["step_time_s"] for r in rows], "rollout": [r["rollout_s"] for r in rows],
             "update": [r["logprob_s"] + r["update_s"] for r in rows],
             "other": [r["step_time_s"] - r["rollout_s"] - r["logprob_s"] - r["update_s"] for r in rows]}
    out = split_medians(parts)
    out["sync_s"] = median([r["sync_s"] for r in rows])
    out["generated_tokens_per_step"] = median([r["sampled_tokens"] for r in rows])
    out["generated_min"] = min(r["sampled_tokens"] for r in rows)
    out["tokens_per_step"] = median([r["tokens"] for r in rows])
    out["code_calls_mean"] = float(np.mean([r["code_calls_mean"] for r in rows]))
    out["finish_reasons"] = dict(sum((collections.Counter(r["finish_reasons"]) for r in rows), collections.Counter()))
    return out


# ---- TRL GRPO ------------------------------------------------------------------------------

def trl_grpo(model_dir, out_dir, items, prompts, steps, warmup, *, new_tokens, tokenizer, tools=None,
             scripted=None, exact_length=True) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    generated: list[int] = []

    def count(prompts, completions, completion_ids=None, **kwargs):
        generated.append(sum(len(c) for c in completion_ids))
        return [0.0] * len(completions)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.t0)

    args = GRPOConfig(
        output_dir=out_dir, use_cpu=DEVICE == "cpu", bf16=False, fp16=False, per_device_train_batch_size=PROMPTS * GROUP,
        gradient_accumulation_steps=1, num_generations=GROUP, max_completion_length=new_tokens,
        generation_kwargs={"min_new_tokens": new_tokens} if exact_length else None,
        temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", scale_rewards="group",
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9,
        adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch_fused", max_grad_norm=1.0,
        gradient_checkpointing=False, max_steps=warmup + steps, logging_steps=1, report_to="none",
        save_strategy="no", disable_tqdm=True, shuffle_dataset=False, seed=0, dataloader_num_workers=0,
        log_completions=False)
    dataset = Dataset.from_dict({"prompt": prompts, "item": list(range(len(prompts)))})
    timer = StepTimer()
    trainer = GRPOTrainer(model=model_dir, reward_funcs=[reward_of(items), count], args=args,
                          train_dataset=dataset, processing_class=tokenizer, tools=tools, callbacks=[timer])
    timings: dict[str, list[float]] = {"_generate": [], "_generate_and_score_completions": []}
    for name, record in timings.items():
        def timed(*a, _f=getattr(trainer, name), _r=record, **k):
            t0 = time.perf_counter()
            result = _f(*a, **k)
            _r.append(time.perf_counter() - t0)
            return result
        setattr(trainer, name, timed)
    if scripted is not None:
        scripted(trainer)
    trainer.train()
    step = timer.times[warmup:]
    gen = timings["_generate"][warmup:]
    score = timings["_generate_and_score_completions"][warmup:]
    assert len(step) == len(gen) == len(score) == steps, (len(step), len(gen), len(score))
    parts = {"step": step, "rollout": gen, "update": [s - g for s, g in zip(step, score)],
             "other": [c - g for c, g in zip(score, gen)]}  # other: rewards, padding, advantages
    out = split_medians(parts)
    out["generated_tokens_per_step"] = median(generated[warmup:])
    out["generated_min"] = min(generated[warmup:])
    return out


def split_medians(parts: dict) -> dict:
    """The medians of a run's per-step times, and the times themselves (to pool runs)."""
    return {"step_time_s": median(parts["step"]), "rollout_s": median(parts["rollout"]),
            "update_s": median(parts["update"]), "other_s": median(parts["other"]), "parts": parts,
            "step_times": parts["step"]}


def pooled(runs: list[dict]) -> dict:
    """Several runs of one side as one: medians over all their timed steps; token counts must agree
    (the same prompts and lengths in every round)."""
    for key in ("generated_tokens_per_step", "tokens_per_step"):
        values = {r[key] for r in runs if key in r}
        assert len(values) <= 1, f"rounds differ in {key}: {values}"
    parts = {k: [x for r in runs for x in r["parts"][k]] for k in runs[0]["parts"]}
    out = {**runs[0], **split_medians(parts), "runs": len(runs),
           "generated_min": min(r["generated_min"] for r in runs)}
    if "sync_s" in out:
        out["sync_s"] = median([r["sync_s"] for r in runs])
    if "finish_reasons" in out:
        out["finish_reasons"] = dict(sum((collections.Counter(r["finish_reasons"]) for r in runs), collections.Counter()))
    return out


# ---- with code: a scripted policy on both sides ------------------------------------------------

class CodeScript:
    """Per (item, round): `think` tokens whose count depends on both, then a code call (the
    framework's own format), or the answer after the last call."""

    def __init__(self, tok, calls: int, sleep_ms: int):
        code = f"import time\ntime.sleep({sleep_ms / 1000:g})\nprint(6 * 7)"
        think = tok.encode("Let me compute this step by step. ") * 20
        self.think = lambda item, rnd: think[:4 + (7 * item + 13 * rnd) % 29]
        self.calls, self.eos = calls, tok.convert_tokens_to_ids("<|im_end|>")
        self.answer = tok.encode("So the answer is <<<42>>>")
        self.rci_call = tok.encode(f"```python\n{code}\n```")
        self.trl_call = tok.encode('<tool_call>\n{"name": "python", "arguments": {"code": '
                                   + json.dumps(code) + "}}\n</tool_call>") + [self.eos]

    def rci_fast(self, item: int, rnd: int) -> list[int]:
        # the answer then EOS, as TRL's side: rci_fast's engine samples one token after an answer
        # that ends the text (a '>' could still belong to it)
        return self.think(item, rnd) + (self.rci_call if rnd < self.calls else self.answer + [self.eos])

    def trl(self, item: int, rnd: int) -> list[int]:
        return self.think(item, rnd) + (self.trl_call if rnd < self.calls else self.answer + [self.eos])


def rci_fast_scripted(script: CodeScript, item_of_prompt: dict):
    def install(trainer):
        def force(segments_per_row, logits):
            out = torch.full_like(logits, float("-inf"))
            for i, segments in enumerate(segments_per_row):
                item = item_of_prompt[tuple(segments[0].ids)]
                rnd = sum(s.kind == "tool" for s in segments)
                done = len(segments[-1].ids) if segments[-1].kind == "model" else 0
                ids = script.rci_fast(item, rnd)
                out[i, ids[done] if done < len(ids) else script.eos] = 0.0
            return out
        return force
    return install


def trl_scripted(script: CodeScript, item_of_question: dict, tok):
    """Wraps the policy's generate (which TRL calls for every round) with a logits processor
    that plays the script; rows are told apart by their question, rounds by the tool results."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Force(LogitsProcessor):
        def __init__(self, plans, start):
            self.plans, self.start = plans, start

        def __call__(self, input_ids, scores):
            out = torch.full_like(scores, float("-inf"))
            done = input_ids.shape[1] - self.start
            for row, plan in enumerate(self.plans):
                out[row, plan[done] if done < len(plan) else script.eos] = 0.0
            return out

    def install(trainer):
        model = trainer.model
        original = model.generate

        def generate(input_ids=None, attention_mask=None, **kwargs):
            plans = []
            for row, mask in zip(input_ids, attention_mask):
                text = tok.decode(row[mask.bool()])
                question = text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
                plans.append(script.trl(item_of_question[question], text.count("<tool_response>")))
            processors = LogitsProcessorList([Force(plans, input_ids.shape[1])])
            return original(input_ids=input_ids, attention_mask=attention_mask, logits_processor=processors,
                            **kwargs)
        model.generate = generate
    return install


def make_python_tool(sandbox):
    def python(code: str) -> str:
        """Runs Python code and returns what it printed.

        Args:
            code: The Python source code to run.
        """
        result = sandbox.run(code, timeout_s=10)
        return result.stdout + result.stderr
    return python


# ---- SFT ----------------------------------------------------------------------------------

def rci_fast_sft(model_dir, data_file, out_dir, steps, warmup, batch_size) -> tuple[dict, object]:
    from rci_fast.train import SFTTrainer

    overrides = {"out_dir": out_dir, "model.path": model_dir, "data.train_file": data_file,
                 "train.batch_size": batch_size, "train.micro_batch_tokens": 16384, "train.lr": 1e-4,
                 "train.schedule": "constant", "train.max_steps": warmup + steps, "train.grad_clip": 1.0,
                 "train.betas": "[0.9,0.999]", "checkpoint.export_at_end": False, "train.mixed_precision": "fp32"}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()], cls=SFTConfig)
    trainer = SFTTrainer(cfg, DIST)
    rows = [trainer.train_step() for _ in range(warmup + steps)]
    timed = rows[warmup:]
    return {"step_time_s": median([r["step_time_s"] for r in timed]),
            "tokens_per_step": median([r["tokens"] for r in timed]),
            "tokens_per_s": median([r["tokens_per_s"] for r in timed]),
            "first_loss": rows[0]["loss"]}, trainer.batches


def transformers_packed_inputs(mb, device) -> dict:
    """forward() arguments of a transformers causal LM for rci_fast's packed micro-batch `mb`."""
    from rci_fast.model.transformer import packed_positions

    # HF predicts labels[i + 1] at position i; rci_fast's targets[i] is that label.
    labels = torch.cat([torch.full((1,), -100), mb.targets[:-1]]).unsqueeze(0)
    # Block-diagonal causal mask: with SDPA, position ids alone do not keep the packed
    # sequences apart (the loss then differs from the unpacked one).
    seq = torch.repeat_interleave(torch.arange(len(mb.cu_seqlens) - 1), mb.cu_seqlens.diff())
    mask = (seq[:, None] == seq[None, :]).tril_()[None, None]
    inputs = dict(input_ids=mb.input_ids, position_ids=packed_positions(mb.cu_seqlens).unsqueeze(0),
                  attention_mask=mask, labels=labels)
    return {k: v.to(device) for k, v in inputs.items()}


def transformers_sft(model_dir, batches, steps, warmup) -> dict:
    """The plain loop on the same packed micro-batches as rci_fast's steps."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    times, tokens, first_loss = [], [], None
    for step in range(warmup + steps):
        epoch, index = divmod(step, batches.steps_per_epoch)
        mbs = batches.micro_batches(epoch, index)
        sync()
        t0 = time.perf_counter()
        total = sum(mb.num_trained for mb in mbs)
        loss_sum = 0.0
        for mb in mbs:
            loss = model(**transformers_packed_inputs(mb, DEVICE)).loss * (mb.num_trained / total)
            loss.backward()
            loss_sum += float(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        tokens.append(sum(mb.num_tokens for mb in mbs))
        first_loss = loss_sum if first_loss is None else first_loss
    return {"step_time_s": median(times[warmup:]), "tokens_per_step": median(tokens[warmup:]),
            "tokens_per_s": median([n / t for n, t in zip(tokens[warmup:], times[warmup:])]),
            "first_loss": first_loss}


# ---- main ---------------------------------------------------------------------------------

DIST = None
DEVICE = "cpu"  # --device


def fmt_split(r):
    return f"{r['step_time_s']:7.3f} {r['rollout_s']:7.3f} {r['update_s']:7.3f} {r['other_s']:7.3f}"


@contextlib.contextmanager
def items_in_order(order: list[int]):
    """rci_fast's GRPOTrainer loads its items itself (rollouts.train_items, as imported by
    train/grpo.py); inside this block it gets them in `order`, TRL's dataset order."""
    from rci_fast.train import grpo as grpo_module

    real = grpo_module.train_items

    def reordered(cfg, tokenizer):
        items = real(cfg, tokenizer)
        return [items[i] for i in order]

    grpo_module.train_items = reordered
    try:
        yield
    finally:
        grpo_module.train_items = real


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main() -> int:
    global DIST, DEVICE, ONE_PASS_LOSS, SHARE_PROMPTS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few steps (a sanity run)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--steps", type=int, default=None, help="timed GRPO steps (default 8, quick 2)")
    parser.add_argument("--calls", type=int, default=2, help="code calls per completion in part 3")
    parser.add_argument("--code-sleep-ms", type=int, default=50, help="what each code call sleeps")
    parser.add_argument("--rounds", type=positive_int, default=None,
                        help="GRPO runs per side, alternating (default 2, quick 1): pooled medians")
    parser.add_argument("--skip", default="", help="comma list of parts to skip: grpo,sft,code")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="where both sides run (cuda: fp32 on one GPU, rci_fast with CUDA graphs)")
    parser.add_argument("--one-pass-loss", action="store_true",
                        help="rci_fast's update forms the loss gradient in the forward (algo.one_pass_loss)")
    parser.add_argument("--no-share-prompts", action="store_true",
                        help="rci_fast's update forwards the prompt with every completion (train.share_prompts false)")
    args = parser.parse_args()
    ONE_PASS_LOSS, SHARE_PROMPTS, DEVICE = args.one_pass_loss, not args.no_share_prompts, args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("bench_vs_trl: --device cuda, but CUDA is not available", file=sys.stderr)
        return 2
    try:
        import trl
    except ImportError:
        print("bench_vs_trl: trl is not installed; install the bench extras: pip install -e .[bench]",
              file=sys.stderr)
        return 2
    import transformers

    from rci_fast.sandbox import Sandbox
    from rci_fast.tasks.teacher import generate as teacher_generate
    from rci_fast.tasks.trajectory import write_trajectories
    from rci_fast.train import init_distributed

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    steps = args.steps or (2 if args.quick else 8)
    args.rounds = args.rounds or (1 if args.quick else 2)
    warmup = 1 if args.quick else 2
    code_steps = 2 if args.quick else 4
    sft_steps = 2 if args.quick else 6
    per_task = max(2, (warmup + max(steps, code_steps)) * PROMPTS // len(TASKS) + 1)
    work = Path(tempfile.mkdtemp(prefix="rci-vs-trl-"))
    load1 = os.getloadavg()[0]

    # Data: reasoning-gym prompts (and scripted SFT trajectories of the same tasks).
    items = load_items(TASKS, "train", "train", per_task)
    order = [i for k in range(per_task) for i in range(k, len(items), per_task)]  # interleave tasks
    items = [items[i] for i in order]
    with Sandbox(workers=2) as sb:
        sft_trajs = list(teacher_generate(sb, [t.split("/")[1] for t in TASKS], per_family=8 if args.quick else 24,
                                          seed=0))
    write_trajectories(work / "sft.jsonl", sft_trajs)
    corpus = [render_chat(build_messages(s.prompt), add_generation_prompt=True)
              for split in ("train", "validation") for _, s in load_items(TASKS, "train", split, 300)]
    corpus += [render_chat(t.messages) for t in sft_trajs] * 3
    # Seeded filler words: the BPE trainer's merge count on the task text alone varied between
    # runs (555 to 2048 tokens); with these the vocabulary is always full (2048).
    rng = random.Random(0)
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8))) for _ in range(4000)]
    corpus += [" ".join(rng.choices(words, k=40)) for _ in range(2000)]
    corpus += ['<tool_call>\n{"name": "python", "arguments": {"code": "print(1)"}}\n</tool_call>',
               "<tool_response>\n42\n</tool_response>", "```python\nimport time\nprint(6 * 7)\n```"] * 50
    model_dir = work / "model"
    built = build_model(model_dir, corpus)
    tok, cfg = built["tokenizer"], built["config"]
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)  # as both trainers load it
    DIST = init_distributed(DEVICE)

    # GRPOTrainer loads the items itself (train_items, patched to the interleaved order below):
    # the same list, in the same order, as TRL's unshuffled dataset.
    prompt_texts = [render_chat(build_messages(s.prompt), tok, add_generation_prompt=True) for _, s in items]
    ids = [prompt_ids(tok, s) for _, s in items]
    assert all(tok(text)["input_ids"] == i for text, i in zip(prompt_texts, ids)), "prompt ids differ"
    result = {"device": DEVICE, "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else None,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "trl": trl.__version__, "params": built["params"],
              "matmul_params": matmul_params(cfg), "vocab": len(tok), "completions_per_step": PROMPTS * GROUP,
              "completion_tokens": NEW_TOKENS, "load_avg_1m_start": load1}

    try:
        if "grpo" not in skip:
            # Rounds in the order ours, TRL, TRL, ours, ...: a machine whose speed drifts during the
            # run (this VM's does, by up to ~25%) then slows both sides alike.
            runs: dict[str, list[dict]] = {"rci_fast": [], "trl": []}
            for rnd in range(args.rounds):
                for side in ("rci_fast", "trl") if rnd % 2 == 0 else ("trl", "rci_fast"):
                    if side == "rci_fast":
                        with items_in_order(order):
                            runs[side].append(rci_fast_grpo(str(model_dir), str(work / f"rl{rnd}"), per_task, steps,
                                                            warmup, new_tokens=NEW_TOKENS))
                    else:
                        runs[side].append(trl_grpo(str(model_dir), str(work / f"trl{rnd}"), items, prompt_texts,
                                                   steps, warmup, new_tokens=NEW_TOKENS, tokenizer=tok))
            ours, theirs = pooled(runs["rci_fast"]), pooled(runs["trl"])
            lens = [len(ids[(s * PROMPTS + j) % len(ids)]) for s in range(warmup, warmup + steps)
                    for j in range(PROMPTS) for _ in range(GROUP)]
            per_step = [lens[k:k + PROMPTS * GROUP] for k in range(0, len(lens), PROMPTS * GROUP)]
            floor = grpo_floor(cfg, per_step[len(per_step) // 2], NEW_TOKENS)
            floor["prompt_tokens_mean"] = float(np.mean(lens))
            for r in (ours, theirs):
                r["completion_tok_s"] = r["generated_tokens_per_step"] / r["step_time_s"]
                r["of_floor"] = r["step_time_s"] / floor["floor_s"]
                r["of_floor_in_sequence"] = r["step_time_s"] / floor["floor_s_in_sequence"]
                r["of_shared_floor"] = r["step_time_s"] / floor["shared_floor_s"]
            result["grpo"] = {"rci_fast": ours, "trl": theirs, "floor": floor,
                              "speedup_vs_trl": theirs["step_time_s"] / ours["step_time_s"],
                              "speedup_per_round": [t["step_time_s"] / o["step_time_s"]
                                                    for o, t in zip(runs["rci_fast"], runs["trl"])]}

        if "sft" not in skip:
            batch = 8 if args.quick else 16
            ours_sft, batches = rci_fast_sft(str(model_dir), str(work / "sft.jsonl"), str(work / "sft"),
                                             sft_steps, 1, batch)
            hf_sft = transformers_sft(str(model_dir), batches, sft_steps, 1)
            floor = sft_floor(cfg, batches, range(1, 1 + sft_steps))  # the timed steps (one warm-up)
            for r in (ours_sft, hf_sft):
                r["of_floor"] = r["step_time_s"] / floor["floor_s"]
            result["sft"] = {"rci_fast": ours_sft, "transformers": hf_sft, "batch_size": batch, "floor": floor,
                             "speedup": ours_sft["tokens_per_s"] / hf_sft["tokens_per_s"]}

        if "code" not in skip:
            script = CodeScript(tok, args.calls, args.code_sleep_ms)
            budget = 256
            tool_tok = copy.deepcopy(tok)
            from trl.chat_template_utils import qwen2_5_chat_template
            tool_tok.chat_template = qwen2_5_chat_template
            # Both sides get TRL's prompt: the chat template's tool schema makes it longer.
            tool_ids = [tool_tok.apply_chat_template(build_messages(s.prompt), tools=[make_python_tool(None)],
                                                     add_generation_prompt=True, tokenize=True, return_dict=False)
                        for _, s in items]
            with items_in_order(order):
                ours_code = rci_fast_grpo(str(model_dir), str(work / "rl-code"), per_task, code_steps, 1,
                                          new_tokens=budget, workers=8, prompts=tool_ids,
                                          code=rci_fast_scripted(script, {tuple(p): i for i, p in enumerate(tool_ids)}))
            with Sandbox(workers=2) as sb:
                theirs_code = trl_grpo(
                    str(model_dir), str(work / "trl-code"), items, [build_messages(s.prompt) for _, s in items],
                    code_steps, 1, new_tokens=budget, tokenizer=tool_tok, tools=[make_python_tool(sb)],
                    scripted=trl_scripted(script, {s.prompt: i for i, (_, s) in enumerate(items)}, tool_tok),
                    exact_length=False)
            theirs_code["completion_tokens_with_tool_output"] = theirs_code["generated_tokens_per_step"]
            # Model tokens (what the policy sampled; TRL's completion ids also hold the tool output).
            used = [(s * PROMPTS + j) % len(items) for s in range(1, 1 + code_steps) for j in range(PROMPTS)]
            theirs_code["generated_tokens_per_step"] = sum(
                len(script.trl(i, r)) for i in used for r in range(args.calls + 1)) * GROUP / code_steps
            expected = sum(len(script.rci_fast(i, r)) for i in used for r in range(args.calls + 1)) * GROUP / code_steps
            assert abs(ours_code["generated_tokens_per_step"] - expected) < 1, (ours_code, expected)
            theirs_code["prompt_tokens_mean"] = float(np.mean([len(tool_ids[i]) for i in used]))
            ours_code["prompt_tokens_mean"] = float(np.mean([len(tool_ids[i]) for i in used]))
            for r in (ours_code, theirs_code):
                r["completion_tok_s"] = r["generated_tokens_per_step"] / r["step_time_s"]
            result["with_code"] = {"rci_fast": ours_code, "trl": theirs_code, "calls_per_completion": args.calls,
                                   "code_sleep_ms": args.code_sleep_ms,
                                   "speedup_vs_trl": theirs_code["step_time_s"] / ours_code["step_time_s"],
                                   "rollout_speedup_vs_trl": theirs_code["rollout_s"] / ours_code["rollout_s"]}
    finally:
        DIST.close()
    result["load_avg_1m_end"] = os.getloadavg()[0]
    report(result, args)
    print("JSON " + json.dumps(result))
    return 0


def print_step_table(block: dict, last_header: str, last_cell) -> None:
    """rci_fast's and TRL's step split, tokens and tok/s, then one column of their own."""
    print(f"{'':10} {'step s':>7} {'rollout':>7} {'update':>7} {'other':>7} {'gen tok':>7} {'tok/s':>7} "
          f"{last_header:>7}")
    for name in ("rci_fast", "trl"):
        r = block[name]
        print(f"{name:10} {fmt_split(r)} {r['generated_tokens_per_step']:7.0f} {r['completion_tok_s']:7.0f} "
              f"{last_cell(r)}")


def report(result: dict, args) -> None:
    print(f"tiny Qwen2: {result['params'] / 1e6:.2f}M parameters ({result['matmul_params'] / 1e6:.2f}M in matmuls), "
          f"vocab {result['vocab']}, fp32, {result['gpu'] or str(result['threads']) + ' threads'}; trl {result['trl']}, "
          f"transformers {result['transformers']}, torch {result['torch']}; load avg "
          f"{result['load_avg_1m_start']:.2f} -> {result['load_avg_1m_end']:.2f}")
    if "grpo" in result:
        g, f = result["grpo"], result["grpo"]["floor"]
        print(f"\nGRPO step: {PROMPTS} prompts x {GROUP} = {PROMPTS * GROUP} completions of {NEW_TOKENS} tokens, "
              f"prompts {f['prompt_tokens_mean']:.0f} tokens on average, no reference model; medians")
        print_step_table(g, "x floor", lambda r: f"{r['of_floor']:7.2f}")
        print(f"{'floor':10} {f['floor_s']:7.3f} {f['floor_generation_s']:7.3f} {f['floor_update_s']:7.3f}"
              f"   ({f['gflop_generation']:.2f} + {f['gflop_update']:.2f} GFLOP at {f['gemm_gflops_decode_m16']:.0f} "
              f"GFLOP/s (decode GEMMs, M=16) / {f['gemm_gflops_update']:.0f} GFLOP/s (update GEMMs))")
        print(f"rci_fast is {g['speedup_vs_trl']:.2f}x faster per step than TRL; "
              f"{g['rci_fast']['of_floor']:.2f}x the floor (TRL {g['trl']['of_floor']:.2f}x)")
        print(f"with the decode GEMMs at the rate a step's GEMMs reach in sequence "
              f"({f['step_gemms_gflops_decode']:.0f} GFLOP/s: the model's weights streaming through the caches) the "
              f"floor is {f['floor_s_in_sequence']:.3f} s: rci_fast {g['rci_fast']['of_floor_in_sequence']:.2f}x, "
              f"TRL {g['trl']['of_floor_in_sequence']:.2f}x")
        print(f"counting each group's prompt once ({f['gflop_shared_generation']:.2f} + "
              f"{f['gflop_shared_update']:.2f} GFLOP: the engine prefills it once"
              + (", the update forwards it once" if SHARE_PROMPTS else "; with --no-share-prompts not the update")
              + f") the floor is {f['shared_floor_s']:.3f} s: rci_fast {g['rci_fast']['of_shared_floor']:.2f}x, "
              f"TRL {g['trl']['of_shared_floor']:.2f}x")
        if len(g["speedup_per_round"]) > 1:
            print(f"(pooled over {len(g['speedup_per_round'])} rounds, run ours, TRL, TRL, ours, ...; per round: "
                  + ", ".join(f"{x:.2f}x" for x in g["speedup_per_round"]) + ")")
    if "sft" in result:
        s = result["sft"]
        print(f"\nSFT, {s['batch_size']} packed trajectories per step (~{s['rci_fast']['tokens_per_step']:.0f} tokens):")
        for name in ("rci_fast", "transformers"):
            r = s[name]
            print(f"  {name:13} {r['tokens_per_s']:8.0f} tok/s   {r['step_time_s']:.3f} s/step   "
                  f"first-step loss {r['first_loss']:.5f}   {r['of_floor']:.2f}x the floor")
        f = s["floor"]
        print(f"  floor          {f['floor_s']:.3f} s/step ({f['gflop_per_step']:.2f} GFLOP at {f['gemm_gflops']:.0f} GFLOP/s)")
        print(f"  rci_fast {s['speedup']:.2f}x the plain transformers loop")
    if "with_code" in result:
        c = result["with_code"]
        print(f"\nGRPO step with code: {c['calls_per_completion']} calls per completion, each sleeping "
              f"{c['code_sleep_ms']} ms; scripted policy; medians")
        print_step_table(c, "prompt", lambda r: f"{r['prompt_tokens_mean']:7.0f}")
        print(f"(gen tok: model tokens per step; TRL's completions also hold "
              f"{c['trl']['completion_tokens_with_tool_output'] - c['trl']['generated_tokens_per_step']:.0f} tokens of "
              f"tool output and call syntax per step; prompt: mean prompt tokens, the same ids on both sides: "
              "TRL's Qwen2.5 tool template with the python tool's schema)")
        print(f"rci_fast is {c['speedup_vs_trl']:.2f}x faster per step ({c['rollout_speedup_vs_trl']:.2f}x on the "
              f"rollout) than TRL's tools loop")


if __name__ == "__main__":
    sys.exit(main())
