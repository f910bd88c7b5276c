"""Rejection sampling of SFT trajectories from any policy (the paper's recipe with GPT-4o).

The policy is text in, text out, so this module needs no model: given a batch of prompt
conversations (system + user messages) it returns, for each, the rollout as (kind, text) pieces,
'model' for generated text and 'tool' for interpreter output, in order. The rollout engine
provides that by decoding each segment of its trajectories; a test can script it.
For each task, each sample is tried `attempts` times; the first correct, well-formed attempt of
a sample is kept (score 1.0 and a final <<<answer>>>, every code block closed), up to
`max_per_task` trajectories per task.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator

from rci_fast.tasks.base import Task
from rci_fast.tasks.prompt import SYSTEM_PROMPT, build_messages
from rci_fast.tasks.reward import format_problems
from rci_fast.tasks.trajectory import SFTTrajectory, trajectory_from_pieces

Pieces = list[tuple[str, str]]
TextPolicy = Callable[[list[list[dict]]], list[Pieces]]


def rejection_sample(tasks: Iterable[Task], policy: TextPolicy, *, attempts: int = 4,
                     max_per_task: int = 50, samples_per_task: int | None = None,
                     split: str | None = "train", batch_size: int = 64,
                     system_prompt: str = SYSTEM_PROMPT, source: str = "policy") -> Iterator[SFTTrajectory]:
    for task in tasks:
        samples = task.samples(split)[:samples_per_task]
        jobs = [(s, build_messages(s.prompt, system_prompt)) for s in samples for _ in range(attempts)]
        kept_samples: set[str] = set()
        for start in range(0, len(jobs), batch_size):
            if len(kept_samples) >= max_per_task:
                break
            batch = jobs[start:start + batch_size]
            rollouts = policy([messages for _, messages in batch])
            if len(rollouts) != len(batch):
                raise ValueError(f"the policy returned {len(rollouts)} rollouts for {len(batch)} prompts")
            for (sample, messages), pieces in zip(batch, rollouts):
                if sample.id in kept_samples or len(kept_samples) >= max_per_task:
                    continue
                t = trajectory_from_pieces(messages, pieces, task=task, sample=sample, source=source)
                if t.score == 1.0 and not format_problems(t.assistant_turns):
                    kept_samples.add(sample.id)
                    yield t
