"""Row-wise softmax statistics of one logits tile and its gradient, in plain torch (the reference
for the Triton rows).

A tile is fp32 logits [C, Vb]: C tokens by one block of Vb vocabulary columns. With z = logits / T,
block_stats returns per row, relative to the row's max m over the tile:
    s = sum_j exp(z_j - m)        a = sum_j exp(z_j - m) (z_j - m)
which merge across tiles into lse and entropy (linear_logprob.merge_block_stats), and the target's
z if the target column lies in this tile (local target in [0, Vb); anything else means "not here").
grad_block_ needs the merged lse and entropy:
    d logp_y / d z_j  = [j == y] - p_j
    d entropy / d z_j = -p_j (log p_j + entropy)
"""
import torch


def block_stats(logits, local_targets, inv_temp, keep_logits=False):
    """(m, s, a, z_target) for fp32 logits [C, Vb], each [C] fp32; z_target is 0 where the target is
    not in this tile. Overwrites `logits` unless keep_logits (then z - m goes to a new buffer: the
    same values, the same number of passes as a copy would add)."""
    if inv_temp != 1.0:
        z = logits * inv_temp if keep_logits else logits.mul_(inv_temp)
    else:
        z = logits
    here = (local_targets >= 0) & (local_targets < z.shape[1])
    z_target = z.gather(1, local_targets.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1) * here
    m = z.amax(dim=1)
    centred = z - m[:, None] if z is logits and keep_logits else z.sub_(m[:, None])  # z - m
    e = centred.exp()                                 # the one extra [C, Vb] buffer
    s = e.sum(1)
    a = e.mul_(centred).sum(1)                        # in place; torch's cascade sum keeps fp32 accurate
    return m, s, a, z_target


def grad_block_(logits, local_targets, lse, entropy, grad_logp, grad_entropy, inv_temp, out=None):
    """Turn fp32 logits [C, Vb] in place into d loss / d logits (the 1/T included), and return it;
    with `out` given, the result is copied into it (in out's dtype) and out is returned.
    grad_logp and grad_entropy are already zero for ignored tokens; grad_entropy may be None."""
    g = grad_logp * inv_temp
    z = logits.mul_(inv_temp) if inv_temp != 1.0 else logits
    logp = z.sub_(lse[:, None])                       # in place: log p
    if grad_entropy is None:                          # dz = -g p + g [j == y]: no second buffer
        dz = logp.exp_().mul_(-g[:, None])
    else:
        # dz = p (c1 + c2 log p) + g [j == y], with c1 = -g - g_ent H and c2 = -g_ent (all over T).
        g_ent = grad_entropy * inv_temp
        p = logp.exp()
        dz = logp.mul_(-g_ent[:, None]).sub_((g + g_ent * entropy)[:, None]).mul_(p)
        del p
    here = (local_targets >= 0) & (local_targets < dz.shape[1])
    rows = torch.arange(dz.shape[0], device=dz.device)[here]
    dz[rows, local_targets[here]] += g[here]
    return dz if out is None else out.copy_(dz)
