"""Logits processors that script a policy for the rollout tests: the model, cache and sandbox stay
real, only the choice of some tokens is forced."""


def code_first(script: list[int], turns: int = 1):
    """Each episode's first `turns` turns are `script` (token ids of a code block, which the
    engine runs in the sandbox); after that many interpreter outputs the model samples freely."""
    def force(segments_per_row, logits):
        out = logits.clone()
        for row, segments in enumerate(segments_per_row):
            if sum(s.kind == "tool" for s in segments) < turns:
                done = len(segments[-1].ids) if segments[-1].kind == "model" else 0
                out[row] = -1e9
                out[row, script[done]] = 0.0
        return out
    return force
