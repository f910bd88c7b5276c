"""Logits processors that script a policy for the rollout tests: the model, cache and sandbox stay
real, only the choice of some tokens is forced."""


def code_first(script: list[int]):
    """Each episode's first turn is `script` (token ids of a code block, which the engine runs in
    the sandbox); after the interpreter's output the model samples freely."""
    def force(segments_per_row, logits):
        out = logits.clone()
        for row, segments in enumerate(segments_per_row):
            if len(segments) <= 2:  # prompt [+ first model turn]: no interpreter output yet
                done = len(segments[1].ids) if len(segments) == 2 else 0
                out[row] = -1e9
                out[row, script[done]] = 0.0
        return out
    return force
