"""The fixed task split, shaped like the paper's: 107 train tasks, 37 test tasks.

The split lives in split.json (committed, so it never moves when a package or data file
changes); `make_split` is the documented recipe that produced it, and the tests check that it
still reproduces the file. Recipe:
  * Reasoning-Gym datasets that duplicate a SymBench or BBH task, and the two ARC datasets (very
    long grid prompts), are registered but kept out of the split as 'extra' (EXTRA below), which
    leaves 27 BBH + 29 SymBench + 88 RG = 144 tasks, the paper's total.
  * Per source, whole families (variants of one task: eight_queens, eight_queens_2, ...;
    logical_deduction_three/five/seven_objects, ...) go to one side, so no test task has a
    sibling in training; families are drawn in a seeded shuffle until the source's test quota
    (BBH 7, SymBench 7, RG 23) is filled.
Run `python -m rci_fast.tasks.split` to print the recipe's result as JSON.
"""
from __future__ import annotations

import json
import random
import re
from functools import lru_cache
from pathlib import Path

SPLIT_FILE = Path(__file__).with_name("split.json")
SEED = 144
TEST_QUOTA = {"bbh": 7, "symbench": 7, "rg": 23}
EXTRA = (
    # reasoning-gym twins of SymBench / BBH tasks
    "rg/mahjong_puzzle", "rg/n_queens", "rg/pool_matrix", "rg/rotate_matrix", "rg/string_insertion",
    "rg/string_splitting", "rg/string_synthesis", "rg/sudoku", "rg/word_sorting",
    # ARC grids: prompts of several thousand tokens
    "rg/arc_agi", "rg/rearc",
)


def family(name: str) -> str:
    """Tasks that are variants of one another share a family."""
    source, _, task = name.partition("/")
    task = re.sub(r"(_varied_complexity|_2|_hard)$", "", task)
    task = re.sub(r"_(three|five|seven)_objects$", "", task)
    return f"{source}/{task}"


def make_split(names: list[str]) -> dict[str, list[str]]:
    """The recipe above, applied to the registered task names."""
    in_split = [n for n in names if n not in EXTRA]
    test = []
    for source, quota in TEST_QUOTA.items():
        families: dict[str, list[str]] = {}
        for n in in_split:
            if n.startswith(source + "/"):
                families.setdefault(family(n), []).append(n)
        order = sorted(families)
        random.Random(f"{SEED}/{source}").shuffle(order)
        chosen = []
        for fam in order:
            if len(chosen) + len(families[fam]) <= quota:
                chosen += families[fam]
        if len(chosen) != quota:
            raise ValueError(f"cannot fill the {source} test quota of {quota} with whole families")
        test += chosen
    train = [n for n in in_split if n not in test]
    return {"train": sorted(train), "test": sorted(test), "extra": sorted(n for n in names if n in EXTRA)}


@lru_cache(maxsize=1)
def load_split() -> dict[str, tuple[str, ...]]:
    with open(SPLIT_FILE) as f:
        data = json.load(f)
    return {k: tuple(data[k]) for k in ("train", "test", "extra")}


def task_split(name: str) -> str | None:
    """'train', 'test' or 'extra' for a task in the split file; None for a task it does not name."""
    for part, names in load_split().items():
        if name in names:
            return part
    return None


if __name__ == "__main__":
    from rci_fast.tasks.registry import list_tasks

    print(json.dumps(make_split(list_tasks()), indent=1))
