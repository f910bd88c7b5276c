"""Multi-turn SFT on FSDP2: the training loop.

One optimizer step = one global batch of `train.batch_size` trajectories, split over the ranks and
packed into micro-batches. The loss is -sum(log p of trained tokens) / (trained tokens in the whole
global batch), so it and its gradient do not depend on the number of ranks or micro-batches.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.distributed.tensor import DTensor

from rci_fast.config import SFTConfig, config_to_dict
from rci_fast.tasks.trajectory import load_trajectories
from rci_fast.files import atomic_write_text
from rci_fast.train.checkpoint import export_hf, latest_checkpoint, load_checkpoint, save_checkpoint
from rci_fast.train.data import MicroBatch, SFTBatches, tokenize_trajectories
from rci_fast.train.distributed import DistInfo, all_reduce_sum
from rci_fast.train.metrics import MetricsLog
from rci_fast.train.model_source import prepare_model_source
from rci_fast.train.parallelize import compute_dtype, load_sharded

log = logging.getLogger("rci_fast.sft")


class TrainingDiverged(RuntimeError):
    """Too many non-finite losses in a row."""


def forward_backward(model, micro_batches: list[MicroBatch], device, world_size: int = 1):
    """Runs forward and backward over this rank's micro-batches, gradients scaled so that the
    ranks' gradients SUM to the gradient of the global token-mean loss. Returns (sum of -log p
    over this rank's trained tokens, trained tokens over all ranks)."""
    local_count = sum(mb.num_trained for mb in micro_batches)
    global_count = all_reduce_sum(local_count, device) if world_size > 1 else float(local_count)
    # FSDP averages gradients over ranks; multiplying by world_size turns that average into a sum.
    scale = world_size / max(global_count, 1.0)
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    for mb in micro_batches:
        mb = mb.to(device)
        nll = -model(mb.input_ids, mb.targets, mb.cu_seqlens).sum()
        (nll * scale).backward()
        nll_sum += nll.detach()
    return nll_sum, global_count


def clip_grad_norm(parameters, max_norm: float) -> float:
    """Global grad norm over every rank's shards; clips to max_norm when > 0."""
    params = [p for p in parameters if p.grad is not None]
    total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0, foreach=True)
    if isinstance(total, DTensor):  # per-shard partial norms -> the global one (a collective)
        total = total.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
    return float(total)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Linear warmup over warmup_steps, then constant or cosine down to min_lr_ratio at the end."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the process's peak RSS


def start_run(cfg, dist_info: DistInfo, resume: bool) -> tuple[Path, Path]:
    """Seeds, checks and prepares <out_dir> for a training run (SFT or RL); returns (out_dir,
    checkpoint root). A fresh run refuses an out_dir that holds checkpoints."""
    out_dir = Path(cfg.out_dir)
    ckpt_root = out_dir / "checkpoints"
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if not resume and latest_checkpoint(ckpt_root) is not None:
        raise ValueError(f"{out_dir} already holds checkpoints: pass --resume to continue that run, "
                         "or choose another out_dir")
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        if not resume:  # rows of an earlier run that saved no checkpoint
            (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    return out_dir, ckpt_root


def run_steps(trainer, total_steps: int, desc: str, postfix) -> list[dict]:
    """The step loop both trainers share: trainer.train_step() until `total_steps`, a metrics row
    per step (rank 0: metrics.jsonl, TensorBoard, progress bar with `postfix(row)`), a checkpoint
    every checkpoint.every steps and one at the end (not when resumed from the final one)."""
    from tqdm import tqdm

    rows, every = [], trainer.cfg.checkpoint.every
    # An explicit disable= overrides tqdm's own TQDM_DISABLE: honour it (the demo's lanes set it).
    bar = tqdm(total=total_steps, initial=trainer.step, desc=desc, dynamic_ncols=True,
               disable=not trainer.dist.is_main or bool(os.environ.get("TQDM_DISABLE")))
    metrics = MetricsLog(trainer.out_dir, first_step=trainer.step + 1) if trainer.dist.is_main else None
    try:
        while trainer.step < total_steps:
            row = trainer.train_step()
            rows.append(row)
            if metrics is not None:
                metrics.write(row)
                bar.update(1)
                if trainer.step % trainer.cfg.log_every == 0:
                    bar.set_postfix(**postfix(row))
            if every and trainer.step % every == 0 and trainer.step < total_steps:
                trainer.save()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    if trainer.saved_step != trainer.step:
        trainer.save()
    return rows


def resume_from_latest(trainer, restore) -> None:
    """Loads the newest checkpoint under trainer.ckpt_root into its model, optimizer and scheduler;
    `restore(state, path)` checks and restores what is specific to the trainer; then the step
    counters and metrics.jsonl are brought back to the checkpoint's step. (SFT and RL share it.)"""
    path = latest_checkpoint(trainer.ckpt_root)
    if path is None:
        log.warning("--resume: no checkpoint under %s; starting from step 0", trainer.ckpt_root)
        if trainer.dist.is_main:
            drop_metrics_after(trainer.out_dir, 0)  # rows of a run killed before its first checkpoint
        return
    state = load_checkpoint(path, trainer.model, trainer.optimizer, trainer.scheduler)
    restore(state, path)
    trainer.step, trainer.bad_in_a_row = state["step"], state["bad_in_a_row"]
    trainer.saved_step = trainer.step
    if trainer.dist.is_main:
        drop_metrics_after(trainer.out_dir, trainer.step)
    log.info("resumed from %s at step %d", path, trainer.step)


def drop_metrics_after(out_dir: Path, step: int) -> None:
    """On resume: the rows a killed run wrote after its last checkpoint are redone, not doubled."""
    metrics = out_dir / "metrics.jsonl"
    if not metrics.exists():
        return
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            row_step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            if number == len(lines):  # the row a killed run was writing: redone like the others
                break
            raise ValueError(f"{metrics}:{number}: not a metrics row ({e}); remove the line to resume") from None
        if row_step <= step:
            kept.append(line)
    atomic_write_text(metrics, "".join(r + "\n" for r in kept))


class SFTTrainer:
    def __init__(self, cfg: SFTConfig, dist_info: DistInfo, resume: bool = False):
        self.cfg, self.dist = cfg, dist_info
        trajectories = load_trajectories(cfg.data.train_file)  # a bad file fails before out_dir is touched
        self.out_dir, self.ckpt_root = start_run(cfg, dist_info, resume)
        model_dir, self.tokenizer = prepare_model_source(cfg, trajectories, dist_info)
        sequences = tokenize_trajectories(trajectories, self.tokenizer, max_seq_len=cfg.data.max_seq_len,
                                          min_score=cfg.data.min_score,
                                          check_template=cfg.data.check_chat_template,
                                          source=cfg.data.train_file)
        t = cfg.train
        self.batches = SFTBatches(sequences, t.batch_size, t.micro_batch_tokens, cfg.seed,
                                  dist_info.rank, dist_info.world_size)
        self.total_steps = t.max_steps or t.epochs * self.batches.steps_per_epoch
        warmup = t.warmup_steps or round(t.warmup_ratio * self.total_steps)

        # fp32 master weights; FSDP casts to the compute dtype for forward/backward.
        self.compute_dtype = compute_dtype(t.mixed_precision, dist_info.device)
        self.model = load_sharded(model_dir, dist_info, self.compute_dtype, cfg.model.activation_checkpointing)
        self.inner = self.model.model
        self.inner.train()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]  # norms and biases
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=t.lr, betas=tuple(t.betas), eps=t.eps, fused=True)  # one kernel for all tensors (5x on CPU)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, self.total_steps, warmup, t.schedule, t.min_lr_ratio))
        self.step = 0
        self.bad_in_a_row = 0
        self.saved_step = -1  # the step of the newest checkpoint on disk (loaded or written)
        self._signature = None  # _data_signature's, computed once
        if resume:
            self._resume()

    def _data_signature(self) -> dict:
        """What decides the data a step trains on: the sequences (their tokens: a changed data file
        or tokenizer changes them), the batch size and the shuffling seed."""
        if self._signature is None:
            tokens = hashlib.sha256()
            for seq in self.batches.sequences:
                tokens.update(seq.input_ids.numpy().tobytes())
                tokens.update(seq.trainable.numpy().tobytes())
            self._signature = {"num_sequences": len(self.batches.sequences), "batch_size": self.batches.batch_size,
                               "seed": self.batches.seed, "tokens_sha256": tokens.hexdigest()}
        return self._signature

    def _resume(self) -> None:
        def restore(state, path):
            mine = self._data_signature()  # checkpoints from before tokens_sha256 compare the rest
            if any(mine.get(key) != value for key, value in state["data"].items()):
                raise ValueError(f"--resume: {path} was trained on other data or another data order "
                                 f"{state['data']} than this config gives {mine}")

        resume_from_latest(self, restore)

    def save(self) -> Path:
        epoch, index = divmod(self.step, self.batches.steps_per_epoch)
        state = {"step": self.step, "epoch": epoch, "batch_in_epoch": index, "bad_in_a_row": self.bad_in_a_row,
                 "data": self._data_signature()}
        path = save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, self.scheduler, state,
                               keep=self.cfg.checkpoint.keep)
        self.saved_step = self.step
        return path

    def train_step(self) -> dict:
        """One optimizer step on the next global batch; returns its metrics row."""
        start = time.perf_counter()
        epoch, index = divmod(self.step, self.batches.steps_per_epoch)
        micro_batches = self.batches.micro_batches(epoch, index)
        batch_tokens = sum(len(self.batches.sequences[i]) for i in self.batches.global_batch(epoch, index))
        self.optimizer.zero_grad(set_to_none=True)
        nll_sum, trained = forward_backward(self.model, micro_batches, self.dist.device, self.dist.world_size)
        if self.dist.world_size > 1:
            dist.all_reduce(nll_sum)
        loss = nll_sum.item() / max(trained, 1.0)
        grad_norm = clip_grad_norm(self.model.parameters(), self.cfg.train.grad_clip)
        lr = self.scheduler.get_last_lr()[0]
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_a_row += 1
            log.warning("step %d: non-finite loss %s / grad norm %s; step skipped (%d in a row, abort at %d)",
                        self.step + 1, loss, grad_norm, self.bad_in_a_row, self.cfg.train.max_bad_steps)
        self.scheduler.step()
        self.step += 1
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        row = {"step": self.step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "trained_tokens": int(trained), "tokens": batch_tokens, "tokens_per_s": batch_tokens / elapsed,
               "step_time_s": elapsed, "micro_batches": len(micro_batches),
               "peak_mem_mb": peak_memory_mb(self.dist.device), "skipped": not finite}
        if self.bad_in_a_row >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(f"{self.bad_in_a_row} non-finite losses in a row (train.max_bad_steps="
                                   f"{self.cfg.train.max_bad_steps}); last loss {loss}, grad norm {grad_norm}")
        return row

    def train(self) -> list[dict]:
        """Runs to total_steps, writing metrics.jsonl and checkpoints; returns this run's rows."""
        rows = run_steps(self, self.total_steps, "sft", lambda row: dict(
            loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}"))
        if self.cfg.checkpoint.export_at_end:
            self.export(self.out_dir / "hf")
        return rows

    def export(self, out_dir: str | Path) -> None:
        dtype = self.compute_dtype
        export_hf(self.model, self.inner, self.tokenizer, out_dir, dtype)


def run_sft(cfg: SFTConfig, dist_info: DistInfo, resume: bool = False) -> list[dict]:
    trainer = SFTTrainer(cfg, dist_info, resume=resume)
    if dist_info.is_main:
        log.info("sft: %d trajectories, %d steps of %d (%d per epoch), %d rank(s), %s compute",
                 len(trainer.batches.sequences), trainer.total_steps - trainer.step, trainer.total_steps,
                 trainer.batches.steps_per_epoch, dist_info.world_size, trainer.compute_dtype)
    return trainer.train()
