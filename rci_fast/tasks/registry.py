"""One registry over the three sources: names are '<source>/<task>'."""
from __future__ import annotations

from rci_fast.tasks import bbh, rg, symbench
from rci_fast.tasks.base import Task

SOURCES = ("symbench", "bbh", "rg")


def list_tasks(source: str | None = None, split: str | None = None, data_dir=None) -> list[str]:
    """Registered task names, optionally of one source and/or one task split
    ('train', 'test', or 'extra' for registered tasks outside the paper-shaped 107/37 split)."""
    if source not in (None, *SOURCES):
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    names = []
    if source in (None, "symbench"):
        names += [f"symbench/{t}" for t in symbench.list_symbench_tasks(data_dir)]
    if source in (None, "bbh"):
        names += [f"bbh/{t}" for t in bbh.TASKS]
    if source in (None, "rg"):
        names += [f"rg/{t}" for t in rg.list_rg_tasks()]
    if split is not None:
        from rci_fast.tasks.split import task_split

        names = [n for n in names if task_split(n) == split]
    return names


def load_task(name: str, data_dir=None, **options) -> Task:
    """The task called `name`; `data_dir` for BBH/SymBench, `options` for reasoning-gym
    (train_size=, validation_size= and the dataset's own configuration keys)."""
    source, _, task = name.partition("/")
    if source == "bbh":
        if task not in bbh.TASKS:
            raise KeyError(f"unknown BBH task {task!r}; `rci-fast tasks --source bbh` lists them")
        return bbh.BBHTask(task, data_dir=data_dir)
    if source == "symbench":
        return symbench.SymBenchTask(task, data_dir=data_dir)
    if source == "rg":
        if task in rg.LEFT_OUT:
            raise KeyError(f"reasoning-gym dataset {task!r} is left out: {rg.LEFT_OUT[task]}")
        if task not in rg.list_rg_tasks():
            raise KeyError(f"unknown reasoning-gym dataset {task!r}; `rci-fast tasks --source rg` lists them")
        return rg.ReasoningGymTask(task, **options)
    raise KeyError(f"task names look like '<source>/<task>' with source in {SOURCES}; got {name!r}")
