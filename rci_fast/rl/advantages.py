"""GRPO advantages: each completion's reward relative to the other completions of its prompt."""
from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, scale_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """(r − mean of its group) / (std of its group + eps)   (GRPO), or without the division
    (Dr.GRPO, `scale_by_std=False`). rewards: [N] float; group_ids: [N] int, any labels.
    The std is the unbiased one, as in the GRPO reference implementations; a group of one
    completion gets advantage 0."""
    if rewards.dim() != 1 or rewards.shape != group_ids.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} "
                         "must be matching 1-D tensors")
    r = rewards.to(torch.float64)
    _, g = torch.unique(group_ids, return_inverse=True)
    n_groups = int(g.max()) + 1 if g.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g, torch.ones_like(r))
    mean = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g, r) / count
    centred = r - mean[g]
    if not scale_by_std:
        return centred.to(rewards.dtype)
    sq = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, g, centred * centred)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))
    adv = torch.where(count[g] > 1, centred / (std[g] + eps), torch.zeros_like(centred))
    return adv.to(rewards.dtype)
