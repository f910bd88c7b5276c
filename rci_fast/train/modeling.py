"""The model as the trainer runs it: hidden states and the fused log-prob head in one forward.

FSDP2 gathers a module's parameters in hooks around its forward(). The Transformer's lm_head
weight is used by fused_linear_logprob, not by a forward call, so the trainer wraps the model in
TokenLogprobs and shards that wrapper as the root: the root's parameters (embeddings, final norm,
lm_head) are then gathered for exactly the span of one forward.
"""
from __future__ import annotations

import torch
from torch import nn

from rci_fast.kernels import fused_linear_logprob, linear_policy_loss
from rci_fast.model import Transformer
from rci_fast.train.data import IGNORE


class TokenLogprobs(nn.Module):
    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
                temperature: float = 1.0, return_entropy: bool = False, one_pass_loss: dict | None = None,
                expand: torch.Tensor | None = None):
        """log p(targets[t] | tokens <= t) as fp32 [N] for packed input_ids [1, N] (0 where the
        target is IGNORE); with return_entropy also the entropy of each token's distribution.
        With one_pass_loss (linear_policy_loss's arguments from old_logp on) it returns that loss
        and its stats instead, the gradient formed in the forward (inside this forward, so FSDP
        has lm_head gathered). With expand (shared prompts, data.pack_shared_prompts) targets
        follow the sequences laid out from input_ids, and the head runs on the rows that have a
        target only: the one-pass loss's mask must then be 0 where the target is IGNORE (as
        RLMicroBatch.mask is), and its per-sequence count come as global_seqs."""
        hidden = self.model.hidden_states(input_ids, cu_seqlens=cu_seqlens, expand=expand)[0]
        weight = self.model.lm_head.weight
        if expand is None:
            if one_pass_loss is not None:
                return linear_policy_loss(hidden, weight, targets, temperature=temperature, one_pass=True,
                                          **one_pass_loss)
            return fused_linear_logprob(hidden, weight, targets, temperature=temperature, return_entropy=return_entropy)
        # Shared prompts: the head runs on the tokens that have a target only (of a prompt, its
        # last), their rows gathered straight from the input's, the results spread back.
        keep = (targets != IGNORE).nonzero().squeeze(1)
        rows, kept_targets = hidden.index_select(0, expand.index_select(0, keep)), targets.index_select(0, keep)
        spread = lambda x: x.new_zeros(targets.shape).index_copy(0, keep, x)  # noqa: E731
        if one_pass_loss is not None:  # its per-token arguments and stats kept and spread alike
            args = {k: v.index_select(0, keep) if k in PER_TOKEN_LOSS_ARGS and v is not None else v
                    for k, v in one_pass_loss.items()}
            loss, stats = linear_policy_loss(rows, weight, kept_targets, temperature=temperature, one_pass=True, **args)
            return loss, {k: spread(v) if v.dim() == 1 else v for k, v in stats.items()}
        out = fused_linear_logprob(rows, weight, kept_targets, temperature=temperature, return_entropy=return_entropy)
        return tuple(map(spread, out)) if return_entropy else spread(out)


# linear_policy_loss's arguments that hold one value per token (the others are settings or totals).
PER_TOKEN_LOSS_ARGS = frozenset({"old_logp", "advantages", "mask", "ref_logp", "seq_ids"})
