"""Measuring each training sample's pass rate p (k attempts each) and its improvement potential."""
from __future__ import annotations

import json

import numpy as np

from rci_fast.evaluate import judged_batches
from rci_fast.files import BatchJournal, atomic_open
from rci_fast.rl.curriculum import PAPER_THRESHOLDS, improvement_potential, potential_groups
from rci_fast.tasks.prompt import SYSTEM_PROMPT, build_messages
from rci_fast.tasks.trajectory import trajectory_from_pieces


def estimate_pass_rates(policy, items, k: int = 20, batch_size: int = 64,
                        system_prompt: str = SYSTEM_PROMPT, progress=None,
                        journal: BatchJournal | None = None) -> np.ndarray:
    """p for each (task, sample) in `items`: the fraction of `k` attempts that score 1.0.
    `policy` is text in, pieces out (rci_fast.rollout.policy.engine_policy); attempts of all
    samples are batched together, `batch_size` conversations per policy call. With a journal, a
    killed pass resumes at its first unfinished batch."""
    if k < 1:
        raise ValueError("k must be >= 1")
    jobs = [(i, task, sample, build_messages(sample.prompt, system_prompt))
            for i, (task, sample) in enumerate(items) for _ in range(k)]

    def judge(job, pieces) -> bool:
        _, task, sample, messages = job
        return trajectory_from_pieces(messages, pieces, task=task, sample=sample, source="potential").score == 1.0

    correct = np.zeros(len(items))
    for (i, *_), solved in zip(jobs, judged_batches(policy, jobs, batch_size, judge, progress, journal)):
        correct[i] += solved
    return correct / k


def write_potential(path: str, items, pass_rates, thresholds=PAPER_THRESHOLDS) -> dict:
    """One JSON line per sample (task, sample_id, p, potential, group) and a summary of the
    groups, written atomically. Returns the summary."""
    pi = improvement_potential(pass_rates)
    groups = potential_groups(pi, thresholds)
    with atomic_open(path, encoding="utf-8") as f:
        for (task, sample), p, v, g in zip(items, pass_rates, pi, groups):
            f.write(json.dumps({"task": task.name, "sample_id": sample.id, "p": float(p),
                                "potential": float(v), "group": int(g)}) + "\n")
    return {"samples": len(items), "thresholds": list(thresholds),
            "group_sizes": np.bincount(groups, minlength=len(thresholds) + 1).tolist(),
            "mean_pass_rate": float(np.mean(pass_rates)) if len(items) else 0.0}


def read_potential(path: str) -> list[dict]:
    """The rows write_potential wrote, with file:line errors for malformed ones."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                if not 0.0 <= float(row["p"]) <= 1.0:
                    raise ValueError(f"p={row['p']} is outside [0, 1]")
                rows.append(row)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: bad potential row: {e}") from None
    return rows
