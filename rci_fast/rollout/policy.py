"""The rollout engine as a text-in/text-out policy, for rejection sampling SFT data (gen-sft)."""
from __future__ import annotations

from rci_fast.rollout.engine import RolloutEngine
from rci_fast.rollout.sampling import SamplingParams
from rci_fast.tasks.prompt import render_chat


def engine_policy(engine: RolloutEngine, params: SamplingParams):
    """Returns policy(conversations) -> for each, the rollout as [(kind, text), ...] with kind
    'model' or 'tool', the shape rci_fast.tasks.rejection.rejection_sample expects."""
    tok = engine.tokenizer

    def policy(conversations: list[list[dict]]) -> list[list[tuple[str, str]]]:
        prompts = [tok.encode(render_chat(m, tok, add_generation_prompt=True), add_special_tokens=False)
                   for m in conversations]
        return [[(s.kind, tok.decode(s.ids, skip_special_tokens=True)) for s in t.segments[1:]]
                for t in engine.generate(prompts, params)]

    return policy
