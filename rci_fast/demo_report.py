"""The demo's report: <out>/report.md with the results table and three PNG plots, from the files
the stages wrote (metrics.jsonl of the RL runs, eval/*/eval.json, potential.jsonl, timings)."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from rci_fast.demo import (MODEL_TITLES, elapsed_s, load_code_calls, load_results, paired_gain, read_eval,
                           results_table)
from rci_fast.model import ModelConfig, Transformer
from rci_fast.rl.curriculum import PAPER_THRESHOLDS
from rci_fast.files import atomic_write_text

RL_RUNS = {"curriculum": "GRPO, curriculum", "uniform": "GRPO, uniform"}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _per_task(out: Path, name: str, eval_set: str = "samples", mode: str = "code") -> dict[str, float]:
    report = read_eval(out, name, eval_set)
    return {r["task"]: r["accuracy"] for r in report["modes"].get(mode, [])} if report else {}


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed), imported on use."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(runs: dict[str, list[dict]], steps_per_stage: int, stages: int, path: Path) -> None:
    """Reward and accuracy per step of both RL runs, with the curriculum's stage boundaries."""
    plt = _pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, title in zip(axes, ("reward_mean", "accuracy"), ("mean reward", "rollout accuracy")):
        for mode, rows in runs.items():
            ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=RL_RUNS[mode], marker=".")
        last = max((r["step"] for rows in runs.values() for r in rows), default=0)
        for b in range(steps_per_stage, min(stages * steps_per_stage, last) + 1, steps_per_stage):
            ax.axvline(b + 0.5, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("GRPO step (dashed: curriculum stage boundaries)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_code_calls(runs: dict[str, list[dict]], path: Path) -> None:
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for mode, rows in runs.items():
        ax.plot([r["step"] for r in rows], [r["code_calls_mean"] for r in rows], label=RL_RUNS[mode], marker=".")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("code calls per episode")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_per_task(per_model: dict[str, dict[str, float]], path: Path) -> None:
    """Accuracy per held-out-sample task (code mode), one bar per model."""
    plt = _pyplot()

    tasks = sorted({t for accs in per_model.values() for t in accs})
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(tasks)), 4))
    width = 0.8 / max(len(per_model), 1)
    x = np.arange(len(tasks))
    for i, (name, accs) in enumerate(per_model.items()):
        ax.bar(x + i * width, [accs.get(t, 0.0) for t in tasks], width, label=MODEL_TITLES[name])
    ax.set_xticks(x + width * (len(per_model) - 1) / 2, [t.removeprefix("rg/") for t in tasks],
                  rotation=35, ha="right")
    ax.set_ylabel("accuracy (code mode)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(plan, rl_cfg, timings: dict, lanes: tuple = ()) -> Path:
    """lanes: the groups of stages that ran side by side (their wall time is the longest's)."""
    out = plan.out
    runs = {mode: _read_jsonl(out / f"rl-{mode}" / "metrics.jsonl") for mode in RL_RUNS
            if (out / f"rl-{mode}" / "metrics.jsonl").exists()}
    stages = len(PAPER_THRESHOLDS) + 1  # the potential groups
    plot_training(runs, rl_cfg.curriculum.steps_per_stage, stages, out / "training.png")
    plot_code_calls(runs, out / "code_calls.png")
    per_model = {name: _per_task(out, name) for name in ("sft", "grpo-uniform", "grpo-curriculum")}
    plot_per_task(per_model, out / "per_task.png")

    results = load_results(out)
    model_cfg = json.loads((plan.model_path("base") / "config.json").read_text())
    with torch.device("meta"):  # shapes only, no memory
        params = sum(p.numel() for p in Transformer(ModelConfig.from_hf(model_cfg)).parameters())
    sft_rows = _read_jsonl(out / "sft" / "metrics.jsonl")
    sft_data = _read_jsonl(out / "sft.jsonl")
    trajectories, direct = len(sft_data), sum(t.get("source") == "scripted:direct" for t in sft_data)
    potential = _read_jsonl(out / "potential.jsonl")
    groups = np.bincount([p["group"] for p in potential], minlength=stages)
    r, e = rl_cfg.rollout, rl_cfg.eval
    lines = [
        "# rci_fast demo report", "",
        f"Seed {plan.seed}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores; "
        f"the stages took {elapsed_s(timings, lanes) / 60:.1f} min"
        f"{', the two lanes after SFT side by side' if lanes else ''} (table at the end).", "",
        "## Setup",
        f"- Model: Qwen2 architecture, {params / 1e6:.2f}M parameters (hidden {model_cfg['hidden_size']}, "
        f"{model_cfg['num_hidden_layers']} layers, {model_cfg['num_attention_heads']} heads), byte-level BPE "
        f"tokenizer of {model_cfg['vocab_size']} tokens trained on the SFT data; random init, then "
        f"{plan.warmup_steps} steps of copying random tokens (the stand-in for pretraining: "
        f"rci_fast/train/warmup.py).",
        f"- SFT: {trajectories} scripted-teacher trajectories (code written from the question, run in the "
        f"sandbox, kept when the verifier scores 1.0) over {len(rl_cfg.tasks.train)} reasoning-gym families, "
        f"{direct} of them answered directly without code (the teacher's \"direct\" style, "
        f"rci_fast/tasks/teacher.py); "
        f"{len(sft_rows)} steps, final loss {sft_rows[-1]['loss']:.3f}." if sft_rows else "- SFT: no metrics",
        f"- Improvement potential: p from {rl_cfg.potential.k} attempts per training sample "
        f"({len(potential)} samples, mean p {np.mean([p['p'] for p in potential]):.3f}); samples per "
        f"potential group (Π high to low): {', '.join(map(str, groups))}.",
        f"- GRPO: {rl_cfg.train.steps} steps of {r.prompts_per_step} prompts x {r.group_size} completions "
        f"on {rl_cfg.tasks.samples_per_task} training samples per family that are not in the SFT data, "
        f"lr {rl_cfg.train.lr:g}, KL {rl_cfg.algo.kl_coef:g}; curriculum: stages of "
        f"{rl_cfg.curriculum.steps_per_stage} steps from high to low potential; uniform: all samples "
        f"from the start.",
        f"- Eval: {e.samples_per_task} held-out samples per task (the tasks' validation split), "
        f"{'greedy decoding' if e.temperature == 0 else f'{e.attempts} sampled answer(s) per question at temperature {e.temperature}'}; "
        f"held-out families (never trained on): "
        f"{', '.join(t.removeprefix('rg/') for t in rl_cfg.tasks.test)}. Text-only mode: the same model with "
        f"the text-only system prompt and no interpreter.", "",
        "## Mean accuracy over tasks", "",
        *results_table(lambda name, s, m: f"{results[name][s][m]:.3f}"
                       if m in results.get(name, {}).get(s, {}) else "-"), "",
        "Code calls per episode on held-out samples, code mode: " + "; ".join(
            f"{MODEL_TITLES[n]} {c:.2f}" for n, c in load_code_calls(out).items()) + ".", "",
        *[f"{MODEL_TITLES[n]} - SFT on held-out samples, code mode: {g[0]:+.3f} ± {g[1]:.3f} (the "
          f"evaluation's standard error, paired over questions; not the seed-to-seed spread)."
          for n in ("grpo-uniform", "grpo-curriculum") if (g := paired_gain(out, n)) is not None], "",
        "## Training", "", "![reward and accuracy per step](training.png)", "",
        "![code calls per episode](code_calls.png)", "",
        "## Accuracy per task (held-out samples, code mode)", "", "![accuracy per task](per_task.png)", "",
        "| task | " + " | ".join(MODEL_TITLES[n] for n in per_model) + " |", "|---" * (len(per_model) + 1) + "|",
        *[f"| {t} | " + " | ".join(f"{per_model[n].get(t, 0.0):.3f}" for n in per_model) + " |"
          for t in sorted({t for accs in per_model.values() for t in accs})], "",
        "## Time per stage", "", "| stage | seconds |", "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in timings.items()], ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
