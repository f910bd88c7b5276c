"""codeio's input-prediction questions ask for "a feasible input": an input for which the question's
reference code returns the stated output. The package's scorer gives full marks only to the input
it stored (any other scored by its likeness to that one), although about a third of them have
others easily found (session 21: 10 of 29 with one number or string changed). An answer that is not
the stored input is run through the reference code in the sandbox, and is right when the code
returns the stated output. The trainer's process never runs it: model text and the question's code
both go to the sandbox.
"""
from __future__ import annotations

import functools
import json
import logging
import threading

log = logging.getLogger("rci_fast.tasks")

INPUT_QUESTION = "Can you predict a feasible input"
CODE_MARK = "Tip: Here is a reference code snippet for this question."
RUN_TIMEOUT_S = 5.0  # the reference programs run in milliseconds
MAX_ANSWER_CHARS = 100_000
_RESULT = "__rci_feasible_input_output__ "

_lock = threading.Lock()
_sandbox = None  # one per process, started at the first answer that needs it
_unavailable = False


def asks_for_an_input(entry: dict) -> bool:
    return INPUT_QUESTION in entry["question"] and CODE_MARK in entry["question"]


def _reference_code(question: str) -> str:
    """The code after the tip line, to the end of the question."""
    return question.split(CODE_MARK, 1)[1].split("\n", 1)[1].strip("\n")


def program(question: str, answer: str) -> str:
    """The reference code, then main_solution called on the answer's JSON object, its output printed
    as JSON on a marked line (the code may print too)."""
    return (f"{_reference_code(question)}\n\n"
            "import json as _rci_json\n"
            f"_rci_output = main_solution(**_rci_json.loads({answer!r}))\n"
            f"print('\\n{_RESULT}' + _rci_json.dumps(_rci_output))\n")


def _get_sandbox():
    global _sandbox, _unavailable
    with _lock:
        if _sandbox is None and not _unavailable:
            from rci_fast.sandbox import Sandbox, SandboxError
            try:
                _sandbox = Sandbox(workers=1, timeout_s=RUN_TIMEOUT_S)
            except (SandboxError, OSError) as e:
                _unavailable = True
                log.warning("codeio: the sandbox did not start (%s); feasible inputs other than the "
                            "stored one get the package's partial credit", e)
        return _sandbox


def is_feasible_input(answer: str, entry: dict) -> bool:
    """Whether the answer, a JSON object with the stored input's keys, makes the question's reference
    code return the stated output (run in the sandbox)."""
    if len(answer) > MAX_ANSWER_CHARS or not asks_for_an_input(entry):
        return False
    try:
        inputs = json.loads(answer)
    except (ValueError, RecursionError):
        return False
    if not isinstance(inputs, dict) or set(inputs) != set(entry["metadata"]["input_data"]):
        return False
    return _gives_output(entry["question"], answer, json.dumps(entry["metadata"]["output_data"]))


@functools.lru_cache(maxsize=4096)  # a GRPO group often repeats an answer
def _gives_output(question: str, answer: str, output_json: str) -> bool:
    sandbox = _get_sandbox()
    if sandbox is None:
        return False
    result = sandbox.run(program(question, answer))
    lines = [line for line in result.stdout.splitlines() if line.startswith(_RESULT)]
    if not result.ok or len(lines) != 1:
        return False
    try:
        output = json.loads(lines[0][len(_RESULT):])
    except ValueError:
        return False
    return output == json.loads(output_json)  # the stored output as JSON reads it back (tuples as lists)
