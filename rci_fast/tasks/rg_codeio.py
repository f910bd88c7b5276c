"""codeio's input-prediction questions ask for "a feasible input": an input for which the question's
reference code returns the stated output. The package's scorer gives full marks only to the input
it stored (any other scored by its likeness to that one), although about a third of them have
others easily found (session 21: 10 of 29 with one number or string changed). An answer that is not
the stored input is run through the reference code in the sandbox, and is right when the code
returns the stated output, as JSON writes it (1 and 1.0 and true differ). The trainer's process
never runs it: model text and the question's code both go to the sandbox.

Only where the stored input itself gives the stated output again (a program that draws random
numbers does not: its stored output came from another random state), and only inputs with the
stored input's keys and kinds of values (no float where it holds an int, no string for a list, ...).
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading

log = logging.getLogger("rci_fast.tasks")

INPUT_QUESTION = "Can you predict a feasible input"
CODE_MARK = "Tip: Here is a reference code snippet for this question."
RUN_TIMEOUT_S = 2.0  # the reference programs run in milliseconds
MAX_ANSWER_CHARS = 100_000
MAX_CACHED = 4096
_RESULT = "__rci_feasible_input_output__ "

_lock = threading.Lock()
_sandbox = None  # one per process, started at the first answer that needs it
_unavailable = False
# (question, input) digest -> the output as JSON (None: none), least recently used first; the
# stored inputs' outputs apart, never evicted (one per question)
_outputs: collections.OrderedDict[bytes, str | None] = collections.OrderedDict()
_stored_outputs: dict[bytes, str | None] = {}


def asks_for_an_input(entry: dict) -> bool:
    return INPUT_QUESTION in entry["question"] and CODE_MARK in entry["question"]


def _reference_code(question: str) -> str:
    """The code after the tip line, to the end of the question."""
    return question.split(CODE_MARK, 1)[1].split("\n", 1)[1].strip("\n")


def program(question: str, inputs_json: str) -> str:
    """The reference code, then main_solution called on the JSON object's items, its output printed
    as JSON on a marked line (the code may print too)."""
    return (f"{_reference_code(question)}\n\n"
            "import json as _rci_json\n"
            f"_rci_output = main_solution(**_rci_json.loads({inputs_json!r}))\n"
            f"print('\\n{_RESULT}' + _rci_json.dumps(_rci_output, sort_keys=True))\n")


def _get_sandbox():
    global _sandbox, _unavailable
    with _lock:
        if _sandbox is None and not _unavailable:
            try:
                from rci_fast.sandbox import Sandbox
                # seeded: a program that draws random numbers gives the same output on each run
                _sandbox = Sandbox(workers=1, timeout_s=RUN_TIMEOUT_S, seed=0)
            except (ImportError, RuntimeError, OSError) as e:  # SandboxError is a RuntimeError
                _unavailable = True
                log.warning("codeio: the sandbox did not start (%s); feasible inputs other than the "
                            "stored one get the package's partial credit", e)
        return _sandbox


def _output(question: str, inputs_json: str, stored: bool = False) -> str | None:
    """The reference code's output for these inputs as sorted JSON, or None (it raised, ran out of
    time or memory, printed no result line, or the sandbox is not there). Definite results are
    kept: a GRPO group often repeats an answer."""
    key = hashlib.sha256(f"{question}\0{inputs_json}".encode()).digest()
    cache = _stored_outputs if stored else _outputs
    if key in cache:
        if not stored:
            _outputs.move_to_end(key)
        return cache[key]
    sandbox = _get_sandbox()
    if sandbox is None:
        return None
    try:
        result = sandbox.run(program(question, inputs_json))
    except RuntimeError:  # SandboxError: the sandbox itself failed
        return None
    lines = [line for line in result.stdout.splitlines() if line.startswith(_RESULT)]
    output = lines[0][len(_RESULT):] if result.ok and len(lines) == 1 else None
    if result.status in ("ok", "error"):
        cache[key] = output
        if len(_outputs) > MAX_CACHED:
            _outputs.popitem(last=False)
    return output


def _kind(value) -> str:
    return "bool" if isinstance(value, bool) else "number" if isinstance(value, (int, float)) else type(value).__name__


def _same_kinds(answer, stored) -> bool:
    """Values of the kinds the stored input holds: an int where it holds an int, an int or a float
    where it holds a float, a list of items like its items, a dict with its keys, a string, ..."""
    if isinstance(stored, bool) or isinstance(answer, bool):
        return isinstance(answer, bool) and isinstance(stored, bool)
    if isinstance(stored, int):
        return isinstance(answer, int)
    if isinstance(stored, float):
        return isinstance(answer, (int, float))
    if isinstance(stored, dict):
        return (isinstance(answer, dict) and set(answer) == set(stored)
                and all(_same_kinds(answer[k], stored[k]) for k in stored))
    if isinstance(stored, list):
        if not isinstance(answer, list):
            return False
        examples = {}  # a stored item of each kind stands for the kind; a float admits numbers
        for x in stored:
            if _kind(x) not in examples or isinstance(x, float):
                examples[_kind(x)] = x
        return not stored or all(_kind(x) in examples and _same_kinds(x, examples[_kind(x)]) for x in answer)
    return type(answer) is type(stored)


def is_feasible_input(answer: str, entry: dict) -> bool:
    """Whether the answer, a JSON object like the stored input, makes the question's reference code
    return the stated output, where the stored input does so too (module doc)."""
    if len(answer) > MAX_ANSWER_CHARS or not asks_for_an_input(entry):
        return False
    try:
        inputs = json.loads(answer)
    except (ValueError, RecursionError):
        return False
    stored = entry["metadata"]["input_data"]
    if not _same_kinds(inputs, stored):
        return False
    stated = json.dumps(entry["metadata"]["output_data"], sort_keys=True)
    question = entry["question"]
    return (_output(question, json.dumps(stored), stored=True) == stated
            and _output(question, json.dumps(inputs)) == stated)
