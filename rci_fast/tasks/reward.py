"""The RL reward of one trajectory: correctness + format + a turn-count penalty (all configurable).

A trajectory is judged by the assistant turns alone (text in, score out): each turn is the text
the model wrote between two interpreter results; the answer is read from the last turn.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from rci_fast.tasks.answer import extract_answer
from rci_fast.tasks.base import Sample, Task

_CODE_OPEN_RE = re.compile(r"```python\b")


@dataclass(frozen=True)
class RewardConfig:
    correct: float = 1.0           # times the task score (see partial_credit)
    well_formed: float = 0.1       # a non-empty final <<<answer>>> and every code block closed
    malformed: float = -0.1
    max_turns: int = 6             # more assistant turns than this ...
    too_many_turns: float = -0.1   # ... costs this much
    partial_credit: bool = False   # False: a score below 1 counts as wrong (reasoning-gym gives
                                   # e.g. 0.01 for any well-formatted wrong answer)


@dataclass(frozen=True)
class Reward:
    total: float
    score: float          # the task's score of the final answer, in [0, 1]
    correct: float
    format: float
    turns: float
    problems: tuple[str, ...]


def format_problems(turns: list[str]) -> list[str]:
    """What is wrong with the trajectory's form: no final <<<answer>>> (an empty one is none
    either), unclosed code blocks."""
    problems = []
    answer = extract_answer(turns[-1]) if turns else None
    if answer is None:
        problems.append("no <<<answer>>> in the final turn")
    elif not answer:
        problems.append("an empty <<<>>> answer in the final turn")
    for i, text in enumerate(turns):
        if has_unclosed_code_block(text):
            problems.append(f"turn {i + 1}: unclosed ```python block")
    return problems


def has_unclosed_code_block(text: str) -> bool:
    """A ```python fence without a closing ``` after it."""
    for m in _CODE_OPEN_RE.finditer(text):
        if "```" not in text[m.end():]:
            return True
    return False


def is_void_turn(text: str) -> bool:
    """A turn with neither a code block nor an answer: it neither computes nor concludes."""
    return _CODE_OPEN_RE.search(text) is None and extract_answer(text) is None


def has_void_turn(turns: list[str]) -> bool:
    """For the 'void turn' filter: such trajectories can be dropped from the loss."""
    return any(is_void_turn(t) for t in turns)


def count_turns(turns: list[str]) -> int:
    """The turns the model wrote: an empty one (the placeholder for an episode cut off right after
    an interpreter result, or an EOS sampled first) holds no text and is no turn."""
    return sum(1 for t in turns if t)


def compute_reward(task: Task, sample: Sample, turns: list[str],
                   config: RewardConfig = RewardConfig()) -> Reward:
    score = task.score(sample, turns[-1]) if turns else 0.0
    credit = score if config.partial_credit else float(score >= 1.0)
    problems = format_problems(turns)
    fmt = config.malformed if problems else config.well_formed
    turn_penalty = config.too_many_turns if count_turns(turns) > config.max_turns else 0.0
    correct = config.correct * credit
    return Reward(total=correct + fmt + turn_penalty, score=score, correct=correct, format=fmt,
                  turns=turn_penalty, problems=tuple(problems))
