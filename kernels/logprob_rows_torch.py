"""Row-wise log-softmax statistics and their gradient, in plain torch (the reference for the Triton rows).

Both functions work on one chunk of fp32 logits [C, V] (C tokens), so the caller never holds more
than C x V floats. With z = logits / temperature and lse = logsumexp(z):
    logp_y  = z_y - lse
    entropy = -sum_j p_j log p_j
    d logp_y / d z_j  = [j == y] - p_j
    d entropy / d z_j = -p_j (log p_j + entropy)
"""
import torch


def forward_stats(logits, targets, inv_temp, ignore_index):
    """(logp, lse, entropy), each [C] fp32, from fp32 logits [C, V]. Overwrites `logits`.

    Rows whose target is ignore_index get logp = 0 and entropy = 0.
    """
    ignored = targets == ignore_index
    z = logits.mul_(inv_temp)
    lse = torch.logsumexp(z, dim=1)
    z_target = z.gather(1, targets.masked_fill(ignored, 0)[:, None]).squeeze(1)
    logp_all = z.sub_(lse[:, None])                   # in place: z now holds log p
    entropy = -logp_all.exp().mul_(logp_all).sum(1)   # one extra [C, V] buffer, freed at once
    logp = (z_target - lse).masked_fill_(ignored, 0.0)
    return logp, lse, entropy.masked_fill_(ignored, 0.0)


def grad_logits_(logits, targets, lse, entropy, grad_logp, grad_entropy, inv_temp, ignore_index):
    """Turn fp32 logits [C, V] in place into d loss / d logits (before the temperature: includes 1/T)."""
    ignored = targets == ignore_index
    g = grad_logp.float().masked_fill(ignored, 0.0)
    g_ent = grad_entropy.float().masked_fill(ignored, 0.0)
    logp = logits.mul_(inv_temp).sub_(lse[:, None])   # in place: log p
    p = logp.exp()
    # dz = -g p - g_ent p (log p + H) + g [j == y], built in the logits buffer.
    dz = logp.add_(entropy[:, None]).mul_(p).mul_(-g_ent[:, None])
    dz.sub_(p.mul_(g[:, None]))
    del p
    rows = torch.arange(dz.shape[0], device=dz.device)
    dz[rows, targets.masked_fill(ignored, 0)] += g     # ignored rows add g = 0
    return dz.mul_(inv_temp)
