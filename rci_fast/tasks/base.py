"""What every task looks like from outside: samples in, score out (tasks know nothing of models)."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from rci_fast.tasks.answer import extract_answer

# The project root is two folders above this file (rci_fast/tasks/); the shared data lives
# next to the project: <root>/../shared/data.
PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "data"
DATA_ENV_VAR = "RCI_FAST_DATA"

SAMPLE_SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.2


class TaskDataError(FileNotFoundError):
    """A data directory or file that a task needs is missing or unreadable."""


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The data directory: the argument, else $RCI_FAST_DATA, else ../shared/data of the project."""
    chosen = data_dir or os.environ.get(DATA_ENV_VAR) or DEFAULT_DATA_DIR
    path = Path(chosen).expanduser()
    if not path.is_dir():
        how = ("data_dir argument" if data_dir else
               f"${DATA_ENV_VAR}" if os.environ.get(DATA_ENV_VAR) else "default")
        raise TaskDataError(f"task data directory not found: {path} (from the {how}; pass "
                            f"data_dir=... or set {DATA_ENV_VAR} to a folder holding bbh/ and symbench/)")
    return path


def validation_member(task_name: str, sample_id: str, fraction: float = VALIDATION_FRACTION) -> bool:
    """Stable per-sample train/validation assignment: a hash of the ids, not a shuffle, so adding
    samples to a task never moves the existing ones between splits."""
    digest = hashlib.sha256(f"{task_name}/{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass(frozen=True)
class Sample:
    id: str
    prompt: str                 # the user message
    data: dict = field(repr=False)  # the raw source record (gold answer included)
    task: str = ""


class Task:
    """Base class. Subclasses set the class attributes and implement _load_samples and check."""

    source: str = ""
    verifier: str = ""          # "exact", "checker" or "reasoning-gym": how an answer is judged

    def __init__(self, name: str):
        self.name = name
        self._samples: list[Sample] | None = None

    # -- samples ---------------------------------------------------------------------------
    def samples(self, split: str | None = None) -> list[Sample]:
        """All samples (split=None), or the per-task 'train' / 'validation' part."""
        if split not in (None, *SAMPLE_SPLITS):
            raise ValueError(f"unknown sample split {split!r}; expected None, 'train' or 'validation'")
        if self._samples is None:
            self._samples = self._load_samples()
        if split is None:
            return list(self._samples)
        want_validation = split == "validation"
        # Copies of one prompt (a few SymBench files repeat questions) all follow the first copy:
        # a validation question is never also a training one.
        first_id: dict[str, str] = {}
        for s in self._samples:
            first_id.setdefault(s.prompt, s.id)
        return [s for s in self._samples
                if validation_member(self.name, first_id[s.prompt]) == want_validation]

    def _load_samples(self) -> list[Sample]:
        raise NotImplementedError

    # -- scoring ---------------------------------------------------------------------------
    def score(self, sample: Sample, completion_text: str) -> float:
        """Score in [0, 1] of the answer in the last <<<...>>> of the final assistant text."""
        answer = extract_answer(completion_text)
        if answer is None:
            return 0.0
        return self.score_answer(sample, answer)

    def score_answer(self, sample: Sample, answer: str) -> float:
        """Score of an already extracted answer; a checker error counts as a wrong answer."""
        try:
            return float(self.check(sample, answer))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, ArithmeticError,
                RecursionError):
            return 0.0

    def check(self, sample: Sample, answer: str) -> float | bool:
        raise NotImplementedError

    def gold_answer(self, sample: Sample) -> str:
        """A reference answer as the model should write it inside <<<...>>> (for tests and SFT)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
