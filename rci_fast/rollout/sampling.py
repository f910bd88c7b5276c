"""Token sampling: temperature, top-k, top-p, greedy; seeded; returns the sampled ids' log-probs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rci_fast.model import native


@dataclass
class SamplingParams:
    temperature: float = 1.0        # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                  # 0 = off
    max_new_tokens: int = 512       # model tokens per episode (forced tool tokens not counted)
    max_total_tokens: int = 4096    # prompt + everything appended
    stop: list[str] = field(default_factory=list)
    stop_at_answer: bool = True     # end the episode at the first token after a <<<...>>> answer
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"invalid sampling parameters: {self}")
        if 0 < self.temperature < 1e-3:  # logits / T would overflow to inf (NaN log-probs) near 1e-37
            raise ValueError(f"temperature {self.temperature}: use 0 for greedy decoding (below 1e-3 it "
                             "samples greedily anyway)")
        if self.max_new_tokens < 1 or self.max_total_tokens < 2:
            raise ValueError("max_new_tokens and max_total_tokens must be positive")


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (float32) -> (token ids [B], their log-probs [B]).

    The log-prob is that of the distribution the token was drawn from (after temperature, top-k
    and top-p); greedy reports the log-prob under temperature 1. On a CPU, float32 logits are
    drawn by sampling.cpp where rci_fast's C++ kernels are built: the same draws, to the bit, as
    inverse_cdf_torch. Neither gives gradients (both work in place): a sampler, not a loss."""
    if params.temperature == 0:
        ids = logits.argmax(-1)
        return ids, torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1)
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= params.top_p  # keep the first over top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    # Inverse-CDF sampling: one uniform number per row. torch.multinomial (and any per-logit
    # noise from a seeded generator) costs ~10 ms for 64 x 8k on CPU, more than the model.
    u = torch.rand(logits.shape[0], 1, generator=generator, device=logits.device).clamp_(min=1e-12)
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and native.available():
        # sampling.cpp: the draw and the log-prob below in one call, the same bits
        return torch.ops.rci_fast_cpu.inverse_cdf_sample_logprob(logits.contiguous(), u)
    ids, top, total = inverse_cdf_torch(logits, u)
    return ids.squeeze(-1), (logits.gather(-1, ids) - top - total.log()).squeeze(-1)


def inverse_cdf_torch(logits: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [B, V], uniforms u [B, 1] -> (ids [B, 1] sampled with u, each row's max [B, 1], the
    sum of exp(logits - max) [B, 1]). Four passes over the logits (max, subtract, exp, cumsum);
    on a CPU sampling.cpp gives the same bits block of rows by block, in cache."""
    top = logits.amax(-1, keepdim=True)  # not max(): that also finds the indices, 4x the time
    cdf = (logits - top).exp_().cumsum_(-1)
    total = cdf[:, -1:]
    ids = torch.searchsorted(cdf, u * total).clamp_(max=cdf.shape[-1] - 1)
    return ids, top, total
