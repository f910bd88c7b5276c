"""Files written whole or not at all (what checkpoints, metrics, reports and data files use),
and a journal that lets a long measurement resume."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", encoding: str | None = None):
    """A file that takes `path`'s place only once it is written and synced: a reader, a killed
    process or a power loss sees the old file or the new one, never part of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode, encoding=encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


class BatchJournal:
    """The results of a long measurement's finished batches, appended to `path` as each batch
    ends, so a killed run (a 7B potential pass takes hours) starts again where it stopped.

    The first line is `header` (what is measured and how: model files, settings, items); a
    journal with another header is from other work and is started afresh. A line cut short by
    a kill is ignored. `finish()` deletes the journal once the final result is written."""

    def __init__(self, path: str | Path, header: dict):
        self.path = Path(path)
        header = json.loads(json.dumps(header))  # as it reads back (tuples are lists)
        self.done: dict[int, list] = {}  # batch start -> its records
        if self.path.is_file():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            if lines and _json_or_none(lines[0]) == {"header": header}:
                for line in lines[1:]:
                    row = _json_or_none(line)
                    if isinstance(row, dict) and "start" in row:
                        self.done[row["start"]] = row["records"]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(self.path, encoding="utf-8") as f:  # drops a stale header or a cut line
            f.write(json.dumps({"header": header}) + "\n")
            for start, records in self.done.items():
                f.write(json.dumps({"start": start, "records": records}) + "\n")

    def add(self, start: int, records: list) -> None:
        self.done[start] = records
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"start": start, "records": records}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def file_fingerprint(folder: str | Path) -> list:
    """(name, size, mtime) of each file in a folder: a model rewritten in place reads as another."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).iterdir() if p.is_file())
