"""What `potential`, `rl` and `eval` share: the task samples, the engine, the policy's weights
for the engine, and the reward of a rollout.

Weights for rollouts: the trainer's model is sharded (FSDP2), the engine needs a plain model. Before
each rollout phase every rank copies the current weights into a persistent plain Transformer in the
compute dtype, one parameter at a time: cast the local shard to the compute dtype, all-gather it,
copy, free. Peak memory beyond the shards and the copy is one tensor (the embedding), not the whole
model in fp32 (28 GB for 7B, what a full state dict would gather), and the network moves bf16 on GPU.
The copy costs 15 GB per rank for a 7B model in bf16; gathering per layer while decoding instead
would move the whole model through the network at every decode step (hundreds per rollout phase)
rather than once per phase.
"""
from __future__ import annotations

import logging

import torch
from torch.distributed.tensor import DTensor

from rci_fast.model import Transformer
from rci_fast.rollout import RolloutEngine, SamplingParams, Trajectory
from rci_fast.tasks import RewardConfig, compute_reward, list_tasks, load_task
from rci_fast.tasks.reward import count_turns
from rci_fast.tasks.prompt import SYSTEM_PROMPT, build_messages, render_chat
from rci_fast.tasks.rg import DEFAULT_TRAIN_SIZE

log = logging.getLogger("rci_fast.rollouts")


def load_items(names: list[str], split: str, sample_split: str | None, per_task: int = 0,
               data_dir: str | None = None, skip: int = 0) -> list[tuple]:
    """(task, sample) pairs of the tasks `names` (empty: every task of the task `split`): of each
    task's `sample_split`, the first `skip` samples left out, then the next `per_task` (0: all).
    A procedural (reasoning-gym) task generates as many train samples as that needs."""
    names = list(names) or list_tasks(split=split, data_dir=data_dir)
    if not names:
        raise ValueError(f"no task to run: the task list is empty and the {split} split names none")
    items = []
    for name in names:
        options = {}
        if name.startswith("rg/") and sample_split == "train" and skip:
            options["train_size"] = max(DEFAULT_TRAIN_SIZE, skip + per_task)
        try:
            task = load_task(name, data_dir=data_dir, **options)
        except KeyError as e:
            raise ValueError(f"tasks: {e.args[0]}") from None
        samples = task.samples(sample_split)
        if skip and skip >= len(samples):
            raise ValueError(f"task {name}: skipping {skip} samples leaves none of its {len(samples)} "
                             f"{sample_split} samples")
        items += [(task, s) for s in samples[skip:skip + per_task if per_task else None]]
    if not items:
        raise ValueError(f"tasks {names} hold no {sample_split} samples")
    return items


def train_items(cfg, tokenizer) -> list[tuple]:
    """The training (task, sample) pairs of an RL config: what potential and RL both draw from."""
    t = cfg.tasks
    items = load_items(t.train, "train", "train", t.samples_per_task, t.data_dir, t.skip_per_task)
    return fitting_items(items, tokenizer, cfg.rollout.max_total_tokens, [SYSTEM_PROMPT])


def fitting_items(items: list[tuple], tokenizer, max_total_tokens: int, system_prompts: list[str]) -> list[tuple]:
    """`items` without those whose prompt alone (under any of the system prompts) fills
    max_total_tokens: the engine could not sample one token after it. They are left out with a
    warning, as verl filters overlong prompts, rather than failing a batch hours into a run."""
    kept, dropped = [], {}
    for task, sample in items:
        longest = max(len(prompt_ids(tokenizer, sample, prompt)) for prompt in system_prompts)
        if longest < max_total_tokens:
            kept.append((task, sample))
        else:
            dropped.setdefault(task.name, []).append(longest)
    if dropped:
        n = sum(map(len, dropped.values()))
        detail = ", ".join(f"{name}: {len(lengths)} (up to {max(lengths)} tokens)" for name, lengths in dropped.items())
        if not kept:
            raise ValueError(f"every one of the {n} samples has a prompt of at least rollout.max_total_tokens="
                             f"{max_total_tokens} tokens ({detail}); raise rollout.max_total_tokens")
        log.warning("left out %d of %d samples whose prompt fills rollout.max_total_tokens=%d: %s",
                    n, len(items), max_total_tokens, detail)
    return kept


def prompt_ids(tokenizer, sample, system_prompt: str = SYSTEM_PROMPT) -> list[int]:
    """The rendered conversation start (system, user, assistant header), as engine_policy builds it."""
    text = render_chat(build_messages(sample.prompt, system_prompt), tokenizer, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def sampling_params(rollout_cfg, temperature: float, seed: int) -> SamplingParams:
    return SamplingParams(temperature=temperature, top_p=rollout_cfg.top_p,
                          max_new_tokens=rollout_cfg.max_new_tokens,
                          max_total_tokens=rollout_cfg.max_total_tokens, seed=seed)


def make_sandbox(rollout_cfg, seed: int):
    """The sandbox of one rank: rollout.sandbox_workers workers (0: one per core); every run's
    random state and str hashing start from `seed` (a code call's output depends on its code
    alone)."""
    from rci_fast.sandbox import Sandbox

    return Sandbox(workers=rollout_cfg.sandbox_workers or None, seed=seed % 2**32)


def make_engine(model: Transformer, tokenizer, sandbox, rollout_cfg) -> RolloutEngine:
    # CUDA graphs: 5.8x faster rollouts in the smoke RL run on an H100, the same trajectories
    # (bench/RESULTS.md); a CPU has no graphs to replay.
    graphs = rollout_cfg.cuda_graphs and model.lm_head.weight.is_cuda
    return RolloutEngine(model, tokenizer, sandbox, max_batch=rollout_cfg.max_batch,
                         max_code_calls=rollout_cfg.max_code_calls, code_timeout_s=rollout_cfg.code_timeout_s,
                         result_delay_steps=rollout_cfg.result_delay_steps, cuda_graphs=graphs)


@torch.no_grad()
def sync_weights(sharded, inner: Transformer, rollout_model: Transformer) -> None:
    """Collective: copies the sharded model's current weights into rollout_model (module doc).
    `sharded` is the trainer's root module (FSDP's, or plain in one process), `inner` the
    Transformer inside it."""
    prefix = next(name for name, module in sharded.named_modules() if module is inner) + "."
    target = rollout_model.state_dict()
    written = set()
    for name, param in sharded.named_parameters():  # a tied lm_head comes once, as the embedding
        name = name.removeprefix(prefix)
        if name not in target:
            raise KeyError(f"sync_weights: {name} is not a parameter of the rollout model")
        # Cast the shard first: the all-gather moves the rollout dtype (bf16 on GPU, half of fp32).
        full = param.to(target[name].dtype)
        target[name].copy_(full.full_tensor() if isinstance(full, DTensor) else full)
        written.add(name)
    missing = {name for name, _ in rollout_model.named_parameters()} - written
    if missing:
        raise KeyError(f"sync_weights: no sharded weights for {sorted(missing)[:5]}")


def turns_of(trajectory: Trajectory, tokenizer) -> list[str]:
    """The assistant turns: model text between interpreter results (special tokens dropped). A
    trajectory cut off right after an interpreter result gets an empty last turn (no answer)."""
    turns, previous = [], None
    for segment in trajectory.segments[1:]:
        if segment.kind == "model":
            text = tokenizer.decode(segment.ids, skip_special_tokens=True)
            if previous == "model":
                turns[-1] += text
            else:
                turns.append(text)
        previous = segment.kind
    if previous != "model":
        turns.append("")
    return turns


def reward_config(section) -> RewardConfig:
    return RewardConfig(correct=section.correct, well_formed=section.well_formed, malformed=section.malformed,
                        max_turns=section.max_turns, too_many_turns=section.too_many_turns,
                        partial_credit=section.partial_credit)


def rewards_of(trajectories: list[Trajectory], items: list[tuple], tokenizer, config: RewardConfig):
    """compute_reward of each trajectory against its (task, sample); and its number of turns."""
    out = []
    for trajectory, (task, sample) in zip(trajectories, items):
        turns = turns_of(trajectory, tokenizer)
        out.append((compute_reward(task, sample, turns, config), count_turns(turns)))
    return out
