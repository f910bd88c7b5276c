"""SFT trajectories: one JSON object per line (JSONL), read back with file:line errors.

    {"task": "rg/gcd", "sample_id": "train-3", "score": 1.0, "source": "scripted:code",
     "messages": [{"role": "system", "content": ...}, {"role": "user", "content": ...},
                  {"role": "assistant", "content": "...```python\\n...\\n```"},
                  {"role": "tool", "content": "Code Execution Results:\\n..."},
                  {"role": "assistant", "content": "... <<<answer>>>"}]}

Rules (checked by load_trajectories): an optional system message, then one user message, then
assistant turns; every assistant turn except the last ends with a closed ```python block and is
followed by exactly one tool message (the interpreter's output, from format_result); the last
message is an assistant turn. task/sample_id/score/source are metadata (score: the task's score
of the final answer when the file was written); any other keys are kept as they are.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rci_fast.files import atomic_open
from rci_fast.tasks.prompt import RESULT_HEADER, extract_code

ROLES = ("system", "user", "assistant", "tool")


class TrajectoryFormatError(ValueError):
    """A bad row in a trajectory file; the message starts with 'path:line:'."""


@dataclass
class SFTTrajectory:
    messages: list[dict]
    task: str = ""
    sample_id: str = ""
    score: float | None = None
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def assistant_turns(self) -> list[str]:
        return [m["content"] for m in self.messages if m["role"] == "assistant"]

    @property
    def num_code_calls(self) -> int:
        return sum(m["role"] == "tool" for m in self.messages)

    def to_json(self) -> str:
        row = {"task": self.task, "sample_id": self.sample_id, "score": self.score,
               "source": self.source, "messages": self.messages, **self.extra}
        return json.dumps(row, ensure_ascii=False)


def validate_messages(messages) -> None:
    """Raises ValueError saying what is wrong with a message list (see the module rules)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            raise ValueError(f"message {i}: must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i}: unknown role {m['role']!r} (expected one of {ROLES})")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i}: content must be a string")
    roles = [m["role"] for m in messages]
    start = 1 if roles[0] == "system" else 0
    if roles[start:start + 1] != ["user"]:
        raise ValueError("expected an optional system message, then a user message")
    body = messages[start + 1:]
    if not body or body[-1]["role"] != "assistant":
        raise ValueError("the last message must be an assistant turn")
    for i, m in enumerate(body):
        position = start + 1 + i
        expected = "assistant" if i % 2 == 0 else "tool"
        if m["role"] != expected:
            raise ValueError(f"message {position}: expected {expected}, got {m['role']} "
                             "(assistant and tool messages must alternate)")
        if m["role"] == "assistant" and i < len(body) - 1 and (
                extract_code(m["content"]) is None or not m["content"].rstrip().endswith("```")):
            raise ValueError(f"message {position}: an assistant turn followed by a tool result must "
                             "end with a closed ```python block")
        if m["role"] == "tool" and not m["content"].startswith(RESULT_HEADER):
            raise ValueError(f"message {position}: a tool message starts with {RESULT_HEADER!r}")


_META_KEYS = ("task", "sample_id", "score", "source", "messages")


def parse_trajectory(row: dict) -> SFTTrajectory:
    if not isinstance(row, dict):
        raise ValueError("each line must be a JSON object")
    if "messages" not in row:
        raise ValueError("missing 'messages'")
    validate_messages(row["messages"])
    score = row.get("score")
    if score is not None and not isinstance(score, (int, float)):
        raise ValueError("'score' must be a number or null")
    return SFTTrajectory(messages=row["messages"], task=str(row.get("task", "")),
                         sample_id=str(row.get("sample_id", "")), score=score,
                         source=str(row.get("source", "")),
                         extra={k: v for k, v in row.items() if k not in _META_KEYS})


def load_trajectories(path: str | Path) -> list[SFTTrajectory]:
    """Every trajectory in a JSONL file (blank lines skipped); a bad row raises
    TrajectoryFormatError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trajectory file not found: {path}")
    out = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is reported with its number
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TrajectoryFormatError(f"{path}:{line_no}: not UTF-8 (byte {raw[e.start]:#04x} at "
                                            f"column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                out.append(parse_trajectory(json.loads(line)))
            except json.JSONDecodeError as e:
                raise TrajectoryFormatError(f"{path}:{line_no}: not valid JSON ({e.msg}, column {e.colno})") from None
            except ValueError as e:
                raise TrajectoryFormatError(f"{path}:{line_no}: {e}") from None
    return out


def write_trajectories(path: str | Path, trajectories) -> int:
    """Writes (or replaces) a JSONL file, creating its folder; returns the number of rows. The rows
    go to a temporary file first: an interrupted write leaves any previous file as it was."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with atomic_open(path, encoding="utf-8") as f:
        for t in trajectories:
            validate_messages(t.messages)
            f.write(t.to_json() + "\n")
            n += 1
    return n


def trajectory_from_pieces(prompt_messages: list[dict], pieces: list[tuple[str, str]], *, task,
                           sample, source: str) -> SFTTrajectory:
    """Turn a policy's multi-turn output into a trajectory. `pieces` are (kind, text) in order, as
    a rollout produces them: kind 'model' for sampled text, 'tool' for an interpreter result (the
    tool text with or without the newlines the engine's template puts around it). Consecutive model
    pieces join into one assistant turn. The trajectory is scored with the task."""
    messages = [dict(m) for m in prompt_messages]
    for kind, text in pieces:
        if kind == "model":
            if messages[-1]["role"] == "assistant":
                messages[-1]["content"] += text
            else:
                messages.append({"role": "assistant", "content": text})
        elif kind == "tool":
            # one newline each side: the template's (an empty output keeps its own)
            messages.append({"role": "tool", "content": text.removeprefix("\n").removesuffix("\n")})
        else:
            raise ValueError(f"unknown piece kind {kind!r} (expected 'model' or 'tool')")
    trajectory = SFTTrajectory(messages=messages, task=task.name, sample_id=sample.id, source=source)
    ends_with_answer_turn = messages[-1]["role"] == "assistant"  # not cut off after a tool result
    trajectory.score = task.score(sample, messages[-1]["content"]) if ends_with_answer_turn else 0.0
    return trajectory
