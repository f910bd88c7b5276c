"""Reasoning-Gym tasks through the `reasoning-gym` package: procedural, seeded, scored by the
package's own `score_answer`.

Every dataset of the installed package is registered except those in LEFT_OUT (each with the
reason). Samples are generated lazily and deterministically: the 'train' part from seed
TRAIN_SEED, the 'validation' part from VALIDATION_SEED with any question that also appears in
'train' removed (small datasets repeat questions). A few generators iterate over sets of strings,
whose order changes with each process's string-hash seed (PYTHONHASHSEED); those are generated in
a child process with PYTHONHASHSEED=0, so every process sees the same samples.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import random
import subprocess
import sys
import tempfile

from rci_fast.tasks.base import Sample, Task

TRAIN_SEED = 1000
VALIDATION_SEED = 2000
DEFAULT_TRAIN_SIZE = 200
DEFAULT_VALIDATION_SIZE = 50

LEFT_OUT = {
    "composite": "a meta-dataset that mixes other datasets; it needs a configuration of its own",
    "game_of_life_halting": "its scorer compares bool(answer) with bool(gold), so any non-empty "
                            "answer scores 1.0 (not a verifier)",
    "boxnet": "no reference answer (answer is None): the scorer cannot be tested against a gold",
    "graph_color": "no reference answer (answer is None): the scorer cannot be tested against a gold",
    "propositional_logic": "no reference answer (answer is None): the scorer cannot be tested "
                           "against a gold",
    "rubiks_cube": "no reference answer (answer is None): the scorer cannot be tested against a gold",
    "rush_hour": "no reference answer (answer is None): the scorer cannot be tested against a gold",
}

# Generators whose samples depend on PYTHONHASHSEED (found by tests/test_tasks_rg.py, which checks
# every registered dataset under two hash seeds): e.g. ransom_note draws letters from list(a set).
HASH_DEPENDENT = {"isomorphic_strings", "knight_swap", "polynomial_multiplication", "ransom_note", "word_ladder"}

_FORMAT_SUFFIX = "\n\nGive your final answer inside <<< >>>, e.g. <<<your answer>>>."

# What a question leaves unsaid but its reference answer assumes.
PROMPT_NOTES = {
    # the generator computes the answer with every '/' replaced by '//' (eval_floordiv), and
    # nested divisions do not always divide evenly: 1276 / 1325 has the reference answer 0
    "basic_arithmetic": "\nTreat every / as integer division rounding down (Python's //).",
}


def generate_entries(dataset_name: str, seed: int, size: int, config: dict):
    """(the reasoning-gym dataset object, its first `size` entries), in this process."""
    import numpy as np
    import reasoning_gym

    # Some generators run sample code that draws from the global random generators (codeio's
    # numpy programs): seed them for the generation, then give the caller its own state back.
    saved = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        # Some generators print progress to stdout; keep that out of the caller's output.
        with contextlib.redirect_stdout(io.StringIO()):
            dataset = reasoning_gym.create_dataset(dataset_name, seed=seed, size=size, **config)
            return dataset, [dataset[i] for i in range(size)]
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])


_CHILD = """import pickle, sys
from rci_fast.tasks.rg import generate_entries
name, seed, size, config, out = pickle.loads(bytes.fromhex(sys.argv[1]))
with open(out, "wb") as f:
    pickle.dump(generate_entries(name, seed, size, config)[1], f)
"""


def _generate_with_fixed_hash_seed(dataset_name: str, seed: int, size: int, config: dict) -> list:
    with tempfile.TemporaryDirectory(prefix="rci-rg-") as tmp:
        out = os.path.join(tmp, "entries.pkl")
        job = pickle.dumps((dataset_name, seed, size, config, out)).hex()
        r = subprocess.run([sys.executable, "-c", _CHILD, job], env=dict(os.environ, PYTHONHASHSEED="0"),
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"generating rg/{dataset_name} in a child process failed:\n{r.stderr[-2000:]}")
        with open(out, "rb") as f:
            return pickle.load(f)


def list_rg_tasks() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(name for name in DATASETS if name not in LEFT_OUT)


class ReasoningGymTask(Task):
    source = "rg"
    verifier = "reasoning-gym"

    def __init__(self, dataset: str, train_size: int = DEFAULT_TRAIN_SIZE,
                 validation_size: int = DEFAULT_VALIDATION_SIZE, **config):
        super().__init__(f"rg/{dataset}")
        if dataset in LEFT_OUT:
            raise KeyError(f"reasoning-gym dataset {dataset!r} is not registered: {LEFT_OUT[dataset]}")
        self.dataset = dataset
        self.sizes = {"train": train_size, "validation": validation_size}
        self.config = config
        self._parts: dict[str, list[Sample]] = {}
        self._scorer = None

    def _generate(self, seed: int, size: int):
        if self.dataset in HASH_DEPENDENT and os.environ.get("PYTHONHASHSEED") != "0":
            return _generate_with_fixed_hash_seed(self.dataset, seed, size, self.config)
        self._scorer, entries = generate_entries(self.dataset, seed, size, self.config)
        return entries

    def samples(self, split: str | None = None) -> list[Sample]:
        if split not in (None, "train", "validation"):
            raise ValueError(f"unknown sample split {split!r}; expected None, 'train' or 'validation'")
        if split is None:
            return self.samples("train") + self.samples("validation")
        if split not in self._parts:
            if split == "train":
                entries = self._generate(TRAIN_SEED, self.sizes["train"])
            else:
                seen = {s.data["question"] for s in self.samples("train")}
                entries = [e for e in self._generate(VALIDATION_SEED, self.sizes["validation"])
                           if e["question"] not in seen]
            suffix = PROMPT_NOTES.get(self.dataset, "") + _FORMAT_SUFFIX
            self._parts[split] = [Sample(id=f"{split}-{i}", prompt=e["question"] + suffix,
                                         data=e, task=self.name) for i, e in enumerate(entries)]
        return list(self._parts[split])

    def check(self, sample: Sample, answer: str) -> float:
        if self._scorer is None:  # in this process: scoring does not depend on the hash seed
            self._scorer = generate_entries(self.dataset, TRAIN_SEED, 1, self.config)[0]
        # The package scores with the dataset object; score_answer reads only `entry`.
        score = self._scorer.score_answer(answer, sample.data)
        return min(1.0, max(0.0, float(score or 0.0)))

    def score_answer(self, sample: Sample, answer: str) -> float:
        try:
            return float(self.check(sample, answer))
        except Exception:  # third-party scorers raise anything on odd text (e.g. int('x'))
            return 0.0

    def gold_answer(self, sample: Sample) -> str:
        return str(sample.data["answer"])
