"""rci_fast.kernels: Triton kernels and their torch reference/fallback.

    from rci_fast.kernels import fused_linear_logprob, policy_loss, linear_policy_loss

fused_linear_logprob  log-probs (+ entropy) of target tokens from hidden states and lm_head weight
policy_loss           clipped PPO/GRPO loss with KL and entropy terms over packed tokens
linear_policy_loss    the two composed: hidden states in, loss and logging stats out
"""
from .linear_logprob import fused_linear_logprob
from .policy_loss import kl_penalty, linear_policy_loss, policy_loss

__all__ = ["fused_linear_logprob", "policy_loss", "linear_policy_loss", "kl_penalty"]
