"""GRPO with the improvement-potential curriculum, on FSDP2: the RL loop.

One step (`GRPOTrainer.train_step`):
  1. the curriculum draws `prompts_per_step` samples (the same on every rank);
  2. each rank takes every world_size-th prompt, copies the current weights into its engine and
     rolls out `group_size` completions per prompt (code runs in the sandbox while decoding);
  3. rewards (compute_reward) and group advantages (GRPO, or Dr.GRPO without the std);
  4. for each of `train.mini_batches` mini-batches (1 by default): trajectories packed without
     padding (their own token ids and trainable mask: nothing is re-tokenized), reference
     log-probs (and, with several mini-batches, old log-probs) in a no-grad pass, then the
     clipped policy loss over the GLOBAL trained-token count (all ranks, all micro-batches),
     backward, clipping, one optimizer step;
  5. online curriculum: every group's correctness updates its sample's pass rate;
  6. one metrics row, checkpoints (with the curriculum state).

Old log-probs: with one optimizer step per rollout batch the policy is unchanged until the
update, so the old log-probs are the detached log-probs of the update's own forward: exactly what
a separate recomputation would give (same weights, same forward), one forward cheaper, and the
ratio starts at 1. The engine's sampling log-probs are not used for the ratio: they come from
another numerical path (the KV-cache decode, bf16 on GPU, top-p filtering); their mean absolute
difference from the trainer's is logged (`sample_logprob_diff`) as a check of that path. With
several mini-batches the old log-probs of all of them are recomputed before the first update.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from rci_fast.config import RLConfig
from rci_fast.kernels import policy_loss
from rci_fast.model.checkpoint import empty_model, read_config
from rci_fast.rl import Curriculum, CurriculumConfig, group_advantages
from rci_fast.rl.potential import read_potential
from rci_fast.rollout import Trajectory
from rci_fast.train.checkpoint import export_hf, save_checkpoint
from rci_fast.train.data import IGNORE, MicroBatch, TokenizedSequence, pack, pack_shared_prompts, split_by_budget
from rci_fast.train.distributed import DistInfo
from rci_fast.train.model_source import load_tokenizer
from rci_fast.train.parallelize import compute_dtype, load_sharded
from rci_fast.train.rollouts import (make_engine, make_sandbox, prompt_ids, reward_config, rewards_of,
                                     sampling_params, sync_weights, train_items)
from rci_fast.train.sft import (TrainingDiverged, clip_grad_norm, lr_factor, peak_memory_mb, resume_from_latest,
                                run_steps, start_run)

log = logging.getLogger("rci_fast.rl")


@dataclasses.dataclass
class RLMicroBatch:
    """A packed micro-batch with per-token values aligned with its targets."""
    batch: MicroBatch
    advantages: torch.Tensor      # [N] the advantage of the token's sequence
    seq_ids: torch.Tensor         # [N] int64, sequence index inside the micro-batch
    sample_logp: torch.Tensor     # [N] the engine's log-prob of the target token (0 where none)
    num_seqs: int = 0
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        return self.batch.targets != IGNORE


@dataclasses.dataclass
class RolloutSequence(TokenizedSequence):
    """A trajectory's ids and trainable mask (token contract: as sampled), its advantage, the
    engine's log-prob of each token and the length of its prompt."""
    advantage: float = 0.0
    sample_logp: torch.Tensor | None = None
    prompt_len: int = 0

    @classmethod
    def of(cls, trajectory: Trajectory, advantage: float) -> "RolloutSequence":
        # Segment by segment through numpy: 5.6x faster than flattening token lists in Python
        # (175 ms instead of 980 for a 128 x 5 x 4k-token step on one core).
        segments = trajectory.segments
        ids = np.concatenate([np.asarray(s.ids, dtype=np.int64) for s in segments])
        mask = torch.tensor([s.trainable for s in segments]).repeat_interleave(
            torch.tensor([len(s.ids) for s in segments]))
        prompt_len = len(segments[0].ids) if segments and segments[0].kind == "prompt" else 0
        return cls(torch.from_numpy(ids), mask, advantage,
                   torch.from_numpy(np.asarray(trajectory.logprobs, dtype=np.float32)), prompt_len)


def pack_rollouts(sequences: list[RolloutSequence], share_prompts: bool = False) -> RLMicroBatch:
    """Sequences back to back (train/data.pack), with per-token values aligned with the targets;
    with share_prompts each distinct prompt goes through the model once (pack_shared_prompts)."""
    batch = pack_shared_prompts(sequences, [s.prompt_len for s in sequences]) if share_prompts else pack(sequences)
    if not sequences:  # the one-token filler of an idle rank
        zeros = torch.zeros(batch.num_tokens)
        return RLMicroBatch(batch, zeros, torch.zeros(batch.num_tokens, dtype=torch.long), zeros, 0)
    lengths = torch.tensor([len(s) for s in sequences])
    # target i is token i + 1: its sampling log-prob is the next one (0 past a sequence's end)
    sample_logp = torch.cat([torch.cat([s.sample_logp[1:], s.sample_logp.new_zeros(1)]) for s in sequences])
    advantages = torch.tensor([s.advantage for s in sequences], dtype=torch.float32)
    return RLMicroBatch(batch, torch.repeat_interleave(advantages, lengths),
                        torch.repeat_interleave(torch.arange(len(sequences)), lengths), sample_logp, len(sequences))


def _logprobs(model, b: MicroBatch, **kwargs):
    """model (TokenLogprobs, sharded or not) on a packed micro-batch, shared prompts included."""
    return model(b.input_ids, b.targets, b.cu_seqlens, expand=b.expand, **kwargs)


def _to(mb: RLMicroBatch, device) -> RLMicroBatch:
    move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
    return RLMicroBatch(mb.batch.to(device), move(mb.advantages), move(mb.seq_ids), move(mb.sample_logp),
                        mb.num_seqs, move(mb.old_logp), move(mb.ref_logp))


def _max_over_ranks(value: int, device) -> int:
    t = torch.tensor(value, dtype=torch.long, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


class GRPOTrainer:
    def __init__(self, cfg: RLConfig, dist_info: DistInfo, resume: bool = False):
        self.cfg, self.dist = cfg, dist_info
        path = cfg.model.path
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"model.path: no config.json in {path}")
        self.tokenizer = load_tokenizer(path, cfg.model.tokenizer)
        self.items = train_items(cfg, self.tokenizer)
        self.curriculum = Curriculum(self._initial_pass_rates(), CurriculumConfig(
            mode=cfg.curriculum.mode, steps_per_stage=cfg.curriculum.steps_per_stage,
            online_floor=cfg.curriculum.online_floor, prior_trials=cfg.curriculum.prior_trials, seed=cfg.seed))
        self.out_dir, self.ckpt_root = start_run(cfg, dist_info, resume)
        device = dist_info.device
        self.compute_dtype = compute_dtype(cfg.train.mixed_precision, device)
        # Policy: fp32 masters, sharded; reference: the same start, frozen, in the compute dtype
        # (sharded too, except in one process: parallelize.py).
        self.model = load_sharded(path, dist_info, self.compute_dtype, cfg.model.activation_checkpointing)
        self.inner = self.model.model
        self.inner.train()
        self.ref = None
        if cfg.algo.kl_coef > 0:
            # Frozen: its shards in the compute dtype (what its forward casts them to anyway).
            self.ref = load_sharded(path, dist_info, self.compute_dtype, master_dtype=self.compute_dtype)
            self.ref.requires_grad_(False).eval()
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in self.model.parameters() if p.dim() >= 2], "weight_decay": t.weight_decay},
             {"params": [p for p in self.model.parameters() if p.dim() < 2], "weight_decay": 0.0}],
            lr=t.lr, betas=tuple(t.betas), eps=t.eps, fused=True)
        total = t.steps * t.mini_batches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, total, t.warmup_steps, t.schedule, t.min_lr_ratio))
        self.reward_cfg = reward_config(cfg.reward)
        self._prompts: dict[int, list[int]] = {}
        self.step = 0
        self.bad_in_a_row = 0
        self.saved_step = -1
        if resume:
            self._resume()
        # The engine's own plain copy of the policy, filled from the shards (no second read of the
        # checkpoint) and refreshed before every rollout phase; the sandbox starts last, so a
        # failed set-up leaves no worker processes behind.
        self.rollout_model = empty_model(read_config(path), self.compute_dtype, device)
        sync_weights(self.model, self.inner, self.rollout_model)
        self.sandbox = make_sandbox(cfg.rollout, cfg.seed)
        self.engine = make_engine(self.rollout_model, self.tokenizer, self.sandbox, cfg.rollout)

    # ---- set-up ----------------------------------------------------------------------------

    def _initial_pass_rates(self) -> np.ndarray:
        """p per training sample from the potential file; staged mode needs it, online mode
        starts at p = 0.5 without it, uniform mode ignores it."""
        mode, path = self.cfg.curriculum.mode, Path(self.cfg.potential_file)
        if mode == "uniform" or (mode == "online" and not path.is_file()):
            return np.full(len(self.items), 0.5)
        if not path.is_file():
            raise FileNotFoundError(f"curriculum.mode=staged needs the potential file {path} "
                                    "(write it with `rci-fast potential --config ...`)")
        rates = {(row["task"], row["sample_id"]): float(row["p"]) for row in read_potential(str(path))}
        missing = [f"{task.name}/{sample.id}" for task, sample in self.items if (task.name, sample.id) not in rates]
        if missing:
            raise ValueError(f"{path} has no pass rate for {len(missing)} training samples (e.g. {missing[:3]}); "
                             "rerun `rci-fast potential` with this config")
        return np.array([rates[(task.name, sample.id)] for task, sample in self.items])

    def _items_sha256(self) -> str:
        return hashlib.sha256("\n".join(f"{task.name}/{sample.id}" for task, sample in self.items).encode()).hexdigest()

    def _state(self) -> dict:
        c = self.curriculum.state_dict()
        return {"step": self.step, "bad_in_a_row": self.bad_in_a_row, "num_items": len(self.items),
                "items_sha256": self._items_sha256(), "groups": self.curriculum.groups.tolist(),
                "curriculum": {"successes": c["successes"].tolist(), "trials": c["trials"].tolist(), "rng": c["rng"]}}

    def _resume(self) -> None:
        def restore(state, path):
            if state["num_items"] != len(self.items):
                raise ValueError(f"--resume: {path} was trained on {state['num_items']} samples, this config "
                                 f"has {len(self.items)}")
            # (checkpoints from before these keys compare the count only)
            items = self._items_sha256()
            if state.get("items_sha256", items) != items:
                raise ValueError(f"--resume: {path} was trained on other samples than this config's tasks give")
            # staged draws follow the groups (online and uniform ones do not)
            moved = int(np.sum(np.asarray(state.get("groups", self.curriculum.groups)) != self.curriculum.groups))
            if moved and self.cfg.curriculum.mode == "staged":
                raise ValueError(f"--resume: {moved} samples are in other curriculum stages than when {path} was "
                                 f"written: {self.cfg.potential_file} changed since; restore it to resume")
            c = state["curriculum"]
            self.curriculum.load_state_dict({"successes": np.array(c["successes"]),
                                             "trials": np.array(c["trials"]), "rng": c["rng"]})

        resume_from_latest(self, restore)

    def save(self) -> Path:
        path = save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer, self.scheduler,
                               self._state(), keep=self.cfg.checkpoint.keep)
        self.saved_step = self.step
        return path

    def close(self) -> None:
        self.sandbox.close()

    # ---- one step ----------------------------------------------------------------------------

    def prompt(self, index: int) -> list[int]:
        if index not in self._prompts:
            self._prompts[index] = prompt_ids(self.tokenizer, self.items[index][1])
        return self._prompts[index]

    def rollout(self, indices: np.ndarray) -> tuple[list[int], list[Trajectory]]:
        """This rank's prompts (positions in `indices`) and their group_size completions each."""
        world, rank, g = self.dist.world_size, self.dist.rank, self.cfg.rollout.group_size
        mine = list(range(rank, len(indices), world))
        params = sampling_params(self.cfg.rollout, self.cfg.rollout.temperature,
                                 seed=(self.cfg.seed * 1_000_003 + self.step) * 4099 + rank)
        prompts = [self.prompt(int(indices[j])) for j in mine for _ in range(g)]
        return mine, self.engine.generate(prompts, params) if prompts else []

    def micro_batches(self, sequences: list[RolloutSequence]) -> list[RLMicroBatch]:
        """Packed under the token budget; every rank gets the same number (FSDP forwards are collective)."""
        groups = split_by_budget(sequences, self.cfg.train.micro_batch_tokens)
        count = max(1, _max_over_ranks(len(groups), self.dist.device))
        share = self.cfg.train.share_prompts
        return [pack_rollouts(groups[k] if k < len(groups) else [], share) for k in range(count)]

    @torch.no_grad()
    def prepare(self, micro_batches: list[RLMicroBatch], old_logprobs: bool) -> None:
        """Reference log-probs (when kl_coef > 0) and, if asked, old log-probs: no-grad passes."""
        temperature = self.cfg.rollout.temperature
        if self.ref is None and not old_logprobs:
            return  # nothing to compute: no copy to the device either
        for mb in micro_batches:
            b = mb.batch.to(self.dist.device)
            if self.ref is not None:
                mb.ref_logp = _logprobs(self.ref, b, temperature=temperature).cpu()
            if old_logprobs:
                mb.old_logp = _logprobs(self.model, b, temperature=temperature).cpu()

    def update(self, micro_batches: list[RLMicroBatch]) -> tuple[torch.Tensor, float, bool]:
        """Forward/backward over this rank's micro-batches and one optimizer step (collective).
        The loss of each micro-batch is divided by the global count, so the ranks' and
        micro-batches' gradients add up to that of the whole batch. Returns the summed stats
        [loss, trained tokens, kl·n, clipped·n, entropy·n, |logp − sample logp|·n, dual-clipped·n]
        over all ranks, the grad norm and whether the step was taken."""
        device, world, a = self.dist.device, self.dist.world_size, self.cfg.algo
        counts = torch.tensor([sum(float(mb.mask.sum()) for mb in micro_batches),
                               sum(float(mb.num_seqs) for mb in micro_batches)],
                              dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        global_tokens, global_seqs = float(counts[0]), float(counts[1])
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(7, dtype=torch.float64, device=device)
        for mb in micro_batches:
            mb = _to(mb, device)
            b, mask = mb.batch, mb.mask
            loss_kwargs = dict(
                advantages=mb.advantages, mask=mask, clip_low=a.clip_low, clip_high=a.clip_high,
                clip_ratio_c=a.clip_ratio_c, ref_logp=mb.ref_logp,
                kl_coef=a.kl_coef, kl_estimator=a.kl_estimator, entropy_coef=a.entropy_coef,
                aggregation=a.aggregation, global_tokens=global_tokens, seq_ids=mb.seq_ids, global_seqs=global_seqs,
                norm=self.cfg.rollout.max_new_tokens * max(global_seqs, 1.0))
            if a.one_pass_loss:  # old_logp None: this forward's own log-probs, detached
                loss, stats = _logprobs(self.model, b, temperature=self.cfg.rollout.temperature,
                                        one_pass_loss=dict(loss_kwargs, old_logp=mb.old_logp))
                logp, entropy = stats["logp"], stats["entropy"]
            else:
                logp, entropy = _logprobs(self.model, b, temperature=self.cfg.rollout.temperature,
                                          return_entropy=True)
                old = mb.old_logp if mb.old_logp is not None else logp.detach()
                loss, stats = policy_loss(logp, old, entropy=entropy, **loss_kwargs)
            (loss * world).backward()  # FSDP averages gradients over ranks; this makes it a sum
            with torch.no_grad():
                m = mask.to(torch.float64)
                kl = (stats["kl"] * m).sum() if "kl" in stats else m.new_zeros(())
                dual = (stats["dual_clipped"] * m).sum() if "dual_clipped" in stats else m.new_zeros(())
                sums += torch.stack([loss.detach().double(), m.sum(), kl, (stats["clipped"] * m).sum(),
                                     (entropy.detach() * m).sum(), ((logp.detach() - mb.sample_logp).abs() * m).sum(),
                                     dual])
        dist.all_reduce(sums)
        grad_norm = clip_grad_norm(self.model.parameters(), self.cfg.train.grad_clip)
        finite = math.isfinite(float(sums[0])) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return sums.cpu(), grad_norm, finite

    def train_step(self) -> dict:
        """One RL step (module doc); returns its metrics row."""
        cfg, g, world = self.cfg, self.cfg.rollout.group_size, self.dist.world_size
        start = time.perf_counter()
        lr = self.scheduler.get_last_lr()[0]
        indices = self.curriculum.draw(self.step, cfg.rollout.prompts_per_step)
        pool = len(self.curriculum.pool(self.step))

        sync_weights(self.model, self.inner, self.rollout_model)
        t_rollout = time.perf_counter()
        sync_s = t_rollout - start
        mine, trajectories = self.rollout(indices)
        rollout_s = time.perf_counter() - t_rollout
        owners = [j for j in mine for _ in range(g)]  # position in `indices` of each trajectory
        scored = rewards_of(trajectories, [self.items[int(indices[j])] for j in owners], self.tokenizer,
                            self.reward_cfg)
        rewards = torch.tensor([r.total for r, _ in scored], dtype=torch.float64)
        advantages = group_advantages(rewards, torch.tensor(owners, dtype=torch.long),
                                      scale_by_std=cfg.algo.advantage == "grpo").tolist() if owners else []
        outcome = {"index": [int(indices[j]) for j in owners], "correct": [float(r.score >= 1.0) for r, _ in scored],
                   "reward": rewards.tolist(), "turns": [n for _, n in scored],
                   "well_formed": [float(not r.problems) for r, _ in scored],
                   "calls": [t.num_code_calls for t in trajectories],
                   "statuses": collections.Counter(s for t in trajectories for s in t.code_statuses),
                   "finish": collections.Counter(t.finish_reason for t in trajectories),
                   "sampled": sum(sum(t.trainable_mask) for t in trajectories),
                   "tokens": sum(len(t.logprobs) for t in trajectories)}
        everyone = [None] * world
        dist.all_gather_object(everyone, outcome)

        # Mini-batches: consecutive slices of the step's prompts; this rank's groups in each.
        per_chunk = cfg.rollout.prompts_per_step // cfg.train.mini_batches
        chunks = [[RolloutSequence.of(t, adv) for t, adv, j in zip(trajectories, advantages, owners)
                   if c * per_chunk <= j < (c + 1) * per_chunk] for c in range(cfg.train.mini_batches)]
        t0 = time.perf_counter()
        batches = [self.micro_batches(chunk) for chunk in chunks]
        for mbs in batches:
            self.prepare(mbs, old_logprobs=cfg.train.mini_batches > 1)
        logprob_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        totals, grad_norms, skipped = torch.zeros(7, dtype=torch.float64), [], 0
        for mbs in batches:
            sums, grad_norm, finite = self.update(mbs)
            totals += sums
            grad_norms.append(grad_norm)
            skipped += not finite
        if self.dist.device.type == "cuda":
            torch.cuda.synchronize()
        update_s = time.perf_counter() - t0
        self.bad_in_a_row = self.bad_in_a_row + 1 if skipped else 0

        merged = {k: [v for o in everyone for v in o[k]] for k in ("index", "correct", "reward", "turns",
                                                                    "well_formed", "calls")}
        if cfg.curriculum.mode == "online":  # the groups' outcomes update their samples' pass rates
            self.curriculum.update(merged["index"], merged["correct"])
        self.step += 1
        n = max(float(totals[1]), 1.0)
        rewards_all = np.array(merged["reward"])
        sampled = sum(o["sampled"] for o in everyone)
        tokens = sum(o["tokens"] for o in everyone)
        row = {"step": self.step, "stage": self.curriculum.stage(self.step - 1) if cfg.curriculum.mode == "staged"
               else None, "pool": pool, "loss": float(totals[0]) / len(batches), "lr": lr,
               "grad_norm": float(np.mean(grad_norms)), "reward_mean": float(rewards_all.mean()),
               "reward_std": float(rewards_all.std()), "accuracy": float(np.mean(merged["correct"])),
               "well_formed": float(np.mean(merged["well_formed"])), "kl": float(totals[2]) / n,
               "clip_frac": float(totals[3]) / n, "dual_clip_frac": float(totals[6]) / n,
               "entropy": float(totals[4]) / n,
               "sample_logprob_diff": float(totals[5]) / n, "trained_tokens": int(totals[1]), "tokens": tokens,
               "sampled_tokens": sampled, "turns_mean": float(np.mean(merged["turns"])),
               "code_calls_mean": float(np.mean(merged["calls"])),
               "code_statuses": dict(sum((o["statuses"] for o in everyone), collections.Counter())),
               "finish_reasons": dict(sum((o["finish"] for o in everyone), collections.Counter())),
               "sync_s": sync_s, "rollout_s": rollout_s, "logprob_s": logprob_s, "update_s": update_s,
               "step_time_s": time.perf_counter() - start, "rollout_tokens_per_s": sampled / rollout_s,
               "update_tokens_per_s": tokens / max(logprob_s + update_s, 1e-9),
               "peak_mem_mb": peak_memory_mb(self.dist.device), "skipped": skipped}
        if cfg.curriculum.mode == "online":
            row["pass_rate_mean"] = float(self.curriculum.pass_rates.mean())
        if self.bad_in_a_row >= cfg.train.max_bad_steps:
            raise TrainingDiverged(f"{self.bad_in_a_row} steps in a row with non-finite losses "
                                   f"(train.max_bad_steps={cfg.train.max_bad_steps}); last loss {row['loss']}")
        return row

    def train(self) -> list[dict]:
        """Runs to train.steps, writing metrics.jsonl and checkpoints; returns this run's rows."""
        rows = run_steps(self, self.cfg.train.steps, "rl", lambda row: dict(
            reward=f"{row['reward_mean']:.3f}", acc=f"{row['accuracy']:.2f}", kl=f"{row['kl']:.4f}",
            stage=row["stage"]))
        if self.cfg.checkpoint.export_at_end:
            export_hf(self.model, self.inner, self.tokenizer, self.out_dir / "hf", self.compute_dtype)
        return rows


def run_rl(cfg: RLConfig, dist_info: DistInfo, resume: bool = False) -> list[dict]:
    if cfg.rollout.temperature <= 0:
        raise ValueError("rollout.temperature: RL samples, so it must be > 0")
    trainer = GRPOTrainer(cfg, dist_info, resume=resume)
    try:
        if dist_info.is_main:
            log.info("rl: %d training samples, curriculum %s, %d steps of %d prompts x %d, %d rank(s), %s compute",
                     len(trainer.items), cfg.curriculum.mode, cfg.train.steps - trainer.step,
                     cfg.rollout.prompts_per_step, cfg.rollout.group_size, dist_info.world_size,
                     trainer.compute_dtype)
        return trainer.train()
    finally:
        trainer.close()
