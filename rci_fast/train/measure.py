"""`rci-fast potential` and `rci-fast eval`: the policy measured through the rollout engine.

Both are data-parallel: under torchrun each rank takes every world_size-th (task, sample) pair,
runs its own engine and sandbox, and rank 0 gathers the results and writes them. Each rank
journals its finished batches (`<output>.partial`, `.rankN` under torchrun): started again
with the same model and settings, a killed run goes on from there, and since every batch
starts from the same seed it ends with the same result as an unbroken one.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch.distributed as dist

from rci_fast.config import RLConfig
from rci_fast.evaluate import TaskReport, evaluate
from rci_fast.model import load_pretrained
from rci_fast.rl.potential import estimate_pass_rates, write_potential
from rci_fast.rollout.policy import engine_policy
from rci_fast.tasks.prompt import SYSTEM_PROMPT, TEXT_ONLY_SYSTEM_PROMPT
from rci_fast.files import BatchJournal, atomic_write_text, file_fingerprint
from rci_fast.train.distributed import DistInfo
from rci_fast.train.model_source import load_tokenizer
from rci_fast.train.parallelize import compute_dtype
from rci_fast.train.rollouts import (fitting_items, load_items, make_engine, make_sandbox, sampling_params,
                                    train_items)

log = logging.getLogger("rci_fast.measure")


def _gather(obj, world_size: int) -> list:
    if world_size == 1:
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class _Progress:
    """A tqdm bar on rank 0 for the engine's batches; progress(done, total) is the callback
    estimate_pass_rates and evaluate take."""

    def __init__(self, desc: str, enabled: bool):
        self.desc, self.enabled, self.bar = desc, enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="episode", dynamic_ncols=True)
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.bar.close()


def _load(path: str, cfg: RLConfig, dist_info: DistInfo):
    if not (Path(path) / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path} (config.json missing)")
    tokenizer = load_tokenizer(path, cfg.model.tokenizer, "the model folder")
    dtype = compute_dtype(cfg.train.mixed_precision, dist_info.device)
    return load_pretrained(path, dtype=dtype, device=dist_info.device).eval(), tokenizer


def _code_fingerprint() -> str:
    """rci_fast's source (its sandbox and kernels packages too: folders of their own in a source
    tree) and the reasoning-gym version."""
    from importlib.metadata import version
    from importlib.util import find_spec

    digest = hashlib.sha256(version("reasoning-gym").encode())
    for package in ("rci_fast", "rci_fast.sandbox", "rci_fast.kernels"):
        root = Path(find_spec(package).submodule_search_locations[0])
        for path in sorted(root.rglob("*.py")) + sorted(root.rglob("*.cpp")) + sorted(root.rglob("*.h")):
            digest.update(f"{package}:{path.relative_to(root)}".encode() + path.read_bytes())
    return digest.hexdigest()


def _journal(output: Path, cfg: RLConfig, dist_info: DistInfo, model_path: str, items, **settings) -> BatchJournal:
    """This rank's journal for `output`: it holds on only while the model's and tokenizer's files,
    the code, the settings and this rank's samples (prompts and golds) stay the same."""
    suffix = ".partial" + (f".rank{dist_info.rank}" if dist_info.world_size > 1 else "")
    digest = hashlib.sha256()
    for task, sample in items:
        digest.update(json.dumps([task.name, sample.id, sample.prompt, sample.data], sort_keys=True,
                                 default=str).encode())
    tokenizer = cfg.model.tokenizer
    header = {"output": str(output), "model": str(model_path), "model_files": file_fingerprint(model_path),
              "tokenizer": [tokenizer, file_fingerprint(tokenizer) if tokenizer else None],
              "mixed_precision": cfg.train.mixed_precision, "code": _code_fingerprint(),
              "items": digest.hexdigest(), "world_size": dist_info.world_size, **settings}
    journal = BatchJournal(output.with_name(output.name + suffix), header)
    if journal.done and dist_info.is_main:
        log.info("%s: resuming after %d finished batches (%s)", output.name, len(journal.done), journal.path)
    return journal


def _finish(journals: list[BatchJournal], dist_info: DistInfo) -> None:
    """Once rank 0 has written the output: every rank's journal goes, and rank 0 removes those
    left by runs with another number of ranks."""
    if dist_info.world_size > 1:
        dist.barrier()
    for journal in journals:
        journal.finish()
        if dist_info.is_main:
            output_name = journal.path.name.partition(".partial")[0]
            for stale in journal.path.parent.glob(glob.escape(output_name) + ".partial*"):
                stale.unlink(missing_ok=True)


def run_potential(cfg: RLConfig, dist_info: DistInfo) -> dict | None:
    """p of every training sample from potential.k attempts (rollout temperature), written to the
    potential file with Π and the 4 groups. Returns the summary on rank 0."""
    rank, world = dist_info.rank, dist_info.world_size
    model, tokenizer = _load(cfg.model.path, cfg, dist_info)
    items = train_items(cfg, tokenizer)
    params = sampling_params(cfg.rollout, cfg.rollout.temperature, seed=cfg.seed * 1009 + rank)
    with make_sandbox(cfg.rollout, cfg.seed) as sandbox:
        policy = engine_policy(make_engine(model, tokenizer, sandbox, cfg.rollout), params)
        mine = items[rank::world]
        journal = _journal(Path(cfg.potential_file), cfg, dist_info, cfg.model.path, mine, k=cfg.potential.k,
                           batch_size=cfg.potential.batch_size, params=dataclasses.asdict(params),
                           rollout=dataclasses.asdict(cfg.rollout), seed=cfg.seed)
        rates = estimate_pass_rates(policy, mine, k=cfg.potential.k, batch_size=cfg.potential.batch_size,
                                    progress=_Progress("potential", dist_info.is_main), journal=journal) \
            if mine else np.zeros(0)
    shards = _gather(rates.tolist(), world)
    summary = None
    if dist_info.is_main:
        p = np.zeros(len(items))
        for r, shard in enumerate(shards):
            p[r::world] = shard
        summary = {**write_potential(cfg.potential_file, items, p), "path": cfg.potential_file}
    _finish([journal], dist_info)
    return summary


def eval_model_path(cfg: RLConfig) -> str:
    """eval.model, else the RL run's export <out_dir>/hf when it exists, else model.path."""
    if cfg.eval.model:
        return cfg.eval.model
    exported = Path(cfg.out_dir) / "hf"
    return str(exported) if (exported / "config.json").is_file() else cfg.model.path


def merge_reports(shards: list[list[TaskReport]]) -> list[TaskReport]:
    """Per-task reports of disjoint sample shards -> one per task (weighted by samples)."""
    by_task: dict[str, list[TaskReport]] = {}
    for shard in shards:
        for report in shard:
            by_task.setdefault(report.task, []).append(report)
    merged = []
    for task, parts in by_task.items():
        n = sum(p.samples for p in parts)
        mean = lambda field: sum(getattr(p, field) * p.samples for p in parts) / n  # noqa: E731
        merged.append(TaskReport(task, n, parts[0].attempts, mean("accuracy"), mean("pass_at_k"),
                                 mean("mean_turns"), mean("mean_code_calls"),
                                 {sid: c for p in parts for sid, c in p.correct.items()}))
    return merged


def run_eval(cfg: RLConfig, dist_info: DistInfo) -> dict | None:
    """Per-task accuracy, pass@k, turns and code calls on the test tasks, in code-interpreter and/or
    text-only mode; writes <out_dir>/eval.json on rank 0 and returns it there."""
    e = cfg.eval
    items = load_items(cfg.tasks.test, "test", "validation", e.samples_per_task, cfg.tasks.data_dir)
    rank, world = dist_info.rank, dist_info.world_size
    path = eval_model_path(cfg)
    model, tokenizer = _load(path, cfg, dist_info)
    system_prompts = {"code": SYSTEM_PROMPT, "text": TEXT_ONLY_SYSTEM_PROMPT}
    items = fitting_items(items, tokenizer, cfg.rollout.max_total_tokens, [system_prompts[m] for m in e.modes])
    params = sampling_params(cfg.rollout, e.temperature, seed=cfg.seed * 1009 + rank)
    mine = items[rank::world]
    results, journals = {}, []
    output = Path(cfg.out_dir) / "eval.json"
    with make_sandbox(cfg.rollout, cfg.seed) as sandbox:
        for mode in e.modes:
            engine = make_engine(model, tokenizer, sandbox if mode == "code" else None, cfg.rollout)
            prompt = system_prompts[mode]
            journals.append(_journal(output.with_name(f"eval-{mode}.json"), cfg, dist_info, path, mine,
                                     mode=mode, attempts=e.attempts, batch_size=e.batch_size,
                                     system_prompt=prompt, params=dataclasses.asdict(params),
                                     rollout=dataclasses.asdict(cfg.rollout), seed=cfg.seed))
            reports = evaluate(engine_policy(engine, params), mine, attempts=e.attempts, system_prompt=prompt,
                               batch_size=e.batch_size, progress=_Progress(f"eval ({mode})", dist_info.is_main),
                               journal=journals[-1]) if mine else []
            results[mode] = merge_reports(_gather(reports, world))
    if dist_info.is_main:
        out = {"model": path, "attempts": e.attempts, "temperature": e.temperature,
               "mean_accuracy": {m: float(np.mean([r.accuracy for r in rs])) for m, rs in results.items()},
               "modes": {m: [dataclasses.asdict(r) for r in rs] for m, rs in results.items()}}
        output.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output, json.dumps(out, indent=1))
    _finish(journals, dist_info)
    if not dist_info.is_main:
        return None
    out["reports"] = results
    return out

