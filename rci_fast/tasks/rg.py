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

import ast
import contextlib
import io
import logging
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from rci_fast.tasks import rg_forms, rg_full_marks
from rci_fast.tasks.answer import MAX_EXPONENT
from rci_fast.tasks.base import Sample, Task

log = logging.getLogger("rci_fast.tasks")

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


@dataclass(frozen=True)
class EvaluatedAnswer:
    """What an answer to a task whose reasoning-gym scorer evaluates it may hold: characters (a
    regex class body) and its longest length; for sympy an arithmetic expression (_arithmetic);
    where the scorer builds Fraction(answer), exponents up to answer.MAX_EXPONENT (1e-99999999 is
    10**99999999 exactly: it does not finish)."""
    chars: str
    max_chars: int
    sympy: bool = False
    exponents: bool = False

    def admits(self, answer: str, gold: str) -> bool:
        if len(answer) > self.max_chars or not answer.isascii() or not re.fullmatch(f"[{self.chars}]*", answer):
            return False
        if self.exponents and any(len(e) > 5 or int(e) > MAX_EXPONENT for e in re.findall(r"[eE][-+]?(\d+)", answer)):
            return False
        # Integral(...) only where the gold itself stays unevaluated: elsewhere it restates the
        # question, and the scorer's derivative of it is the integrand (full marks).
        return not self.sympy or _arithmetic(answer.strip(), allow_integral="Integral" in gold)


SYMPY_FUNCTIONS = {"sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "sinh", "cosh", "tanh",
                   "asinh", "acosh", "atanh", "exp", "log", "ln", "sqrt", "Abs"}
# Single letters for variables and constants, but sympy's N (N(E, 10**9) evaluates a billion
# digits) and S (sympify).
SYMPY_SYMBOLS = ({chr(c) for c in range(ord("a"), ord("z") + 1)} | set("ABCDEFGHIJKLMOPRTUVWXYZ")
                 | {"pi"})
MAX_SYMBOLS = 4  # polynomial_multiplication's x, y, z; an integral's variable and C


def _arithmetic(answer: str, allow_integral: bool) -> bool:
    """Whether the answer, read by Python's parser (not run), is arithmetic sympy evaluates
    quickly: numbers, up to MAX_SYMBOLS symbols, + - * / and powers, calls of SYMPY_FUNCTIONS,
    nothing else (no attribute: pi.n(999999999) evaluates a billion digits). A power's exponent
    is a constant below 100 (or a ratio of two such), its base holds no other power, and a sum
    is raised at most to the 4th: 9**9**9, ((9*x)**99)**99 or (a+b+c+d)**99 would not finish."""
    try:
        tree = ast.parse(answer, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False  # sympy's parser would not read it either
    functions = SYMPY_FUNCTIONS | ({"Integral"} if allow_integral else set())

    def constant(node, bound) -> bool:
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return constant(node.operand, bound)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            return constant(node.left, bound) and constant(node.right, bound)
        return (isinstance(node, ast.Constant) and type(node.value) in (int, float)
                and abs(node.value) < bound)

    def ok(node) -> bool:
        if isinstance(node, ast.Constant):
            return type(node.value) in (int, float)
        if isinstance(node, ast.Name):
            return node.id in SYMPY_SYMBOLS
        if isinstance(node, ast.UnaryOp):
            return isinstance(node.op, (ast.USub, ast.UAdd)) and ok(node.operand)
        if isinstance(node, ast.Call):
            return (isinstance(node.func, ast.Name) and node.func.id in functions and not node.keywords
                    and all(ok(arg) for arg in node.args))
        if not isinstance(node, ast.BinOp) or not isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)):
            return False
        if isinstance(node.op, ast.Pow):
            if isinstance(node.left, ast.Name) and node.left.id == "E":
                return ok(node.right)  # E**(x) is exp(x), which the prompts invite and exp admits
            base_is_sum = isinstance(node.left, ast.BinOp) and isinstance(node.left.op, (ast.Add, ast.Sub))
            nested = any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) for n in ast.walk(node.left))
            return not nested and constant(node.right, 5 if base_is_sum else 100) and ok(node.left)
        return ok(node.left) and ok(node.right)

    symbols = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - functions
    return ok(tree.body) and len(symbols) <= MAX_SYMBOLS


# reasoning-gym scorers that hand the answer to eval() or sympy's parse_expr (itself an eval), or
# to Fraction (coin_flip):
# model text reaches them from the trainer's process ("__import__(...)", "exit()", "9**9**9").
# Their answers are scored only when EvaluatedAnswer admits them; others score 0 unseen.
EVALUATED_ANSWERS = {
    "spiral_matrix": EvaluatedAnswer(r"\d\s,\[\]\-", 4096),   # a list of numbers: partial credit
    "binary_matrix": EvaluatedAnswer(r"\d\s,\[\]\-", 4096),
    "string_insertion": EvaluatedAnswer(r"A-Z'\"\[\],\s", 4096),  # a list of letters: no keyword or call
    "n_queens": EvaluatedAnswer(r"Q_'\"\[\],\s", 4096),
    "countdown": EvaluatedAnswer(r"\d\s+\-*/().", 200, sympy=True),
    "puzzle24": EvaluatedAnswer(r"\d\s+\-*/().", 200, sympy=True),
    "polynomial_multiplication": EvaluatedAnswer(r"\w\s+\-*/().", 600, sympy=True),
    "simple_integration": EvaluatedAnswer(r"\w\s+\-*/().,", 400, sympy=True),
    "intermediate_integration": EvaluatedAnswer(r"\w\s+\-*/().,", 400, sympy=True),
    "coin_flip": EvaluatedAnswer(r"\d\s+\-./,eE", 100, exponents=True),  # Fraction(answer)
}


# A guarded scorer still runs sympy on the answer: differentiating a product of 40 admitted
# factors such as (x+1)**4 takes minutes (16 of them: 6 s), golds take at most 0.14 s. Past this
# limit the answer scores 0.
EVALUATED_ANSWER_TIME_LIMIT_S = 2.0


class ScoringTimeout(BaseException):
    """Not an Exception: a scorer's own `except Exception` must not swallow it."""


class _Alarm:
    expired = False  # the limit was reached (even where a scorer caught the exception)


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises ScoringTimeout in the block after `seconds`, and again every 0.1 s should a bare
    `except:` catch it (SIGALRM: pure-Python work such as sympy's stops between bytecodes).
    Yields an object whose `expired` says whether the limit was reached. A timer already running
    (pytest-timeout's, say) is put back afterwards with the time it had left; where it would fire
    first it stays in charge. 0 s, or a thread other than the main one (only it receives
    signals): no limit."""
    alarm = _Alarm()
    outer_left, outer_interval = signal.getitimer(signal.ITIMER_REAL)
    if seconds <= 0 or threading.current_thread() is not threading.main_thread() or 0 < outer_left <= seconds:
        yield alarm
        return
    inside = True

    def expire(signum, frame):
        if inside:
            alarm.expired = True
            signal.setitimer(signal.ITIMER_REAL, 0.1)
            raise ScoringTimeout(f"scoring took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    start = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield alarm
        finally:
            inside = False
    finally:  # also when the alarm fires just as the block ends
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3), outer_interval)


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
        self._warm = False  # the scorer has run once (outside the time limit)

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
        guard = EVALUATED_ANSWERS.get(self.dataset)
        gold = self.gold_answer(sample)
        # The gold written another way is the gold (rg_forms: the package's scorers gave '"42"' or
        # "42.0" 0 or partial credit); any other answer goes to the guard and the scorer as
        # written, less quotes around it (extract_answer took a leading "Answer:" off).
        answer = rg_forms.clean(answer, gold, self.dataset)
        if rg_forms.same_as_gold(answer, gold, self.dataset):
            answer = gold
        if guard is not None and not guard.admits(answer, gold):
            return 0.0
        if self._scorer is None:  # in this process: scoring does not depend on the hash seed
            self._scorer = generate_entries(self.dataset, TRAIN_SEED, 1, self.config)[0]
        if guard is not None and not self._warm:  # sympy's first parse takes ~0.3 s, seconds on a
            self._scorer.score_answer(gold, sample.data)  # busy machine: not inside the limit
            self._warm = True
        # The package scores with the dataset object; score_answer reads only `entry`.
        with time_limit(EVALUATED_ANSWER_TIME_LIMIT_S if guard is not None else 0.0) as alarm:
            score = min(1.0, max(0.0, float(self._scorer.score_answer(answer, sample.data) or 0.0)))
        if alarm.expired:  # the scorer caught the timeout and returned
            raise ScoringTimeout
        right = rg_full_marks.full_marks(self.dataset, answer, gold, sample.data)
        if right is not None:  # the rule decides a pass; the package's score is partial credit
            return 1.0 if right else min(score, 0.99)
        return score

    def score_answer(self, sample: Sample, answer: str) -> float:
        try:
            return float(self.check(sample, answer))
        except (Exception, SystemExit):  # third-party scorers raise anything on odd text (e.g. int('x'))
            return 0.0
        except ScoringTimeout:
            log.warning("%s: scoring an answer took over %.0f s (%d characters); it scores 0",
                        self.name, EVALUATED_ANSWER_TIME_LIMIT_S, len(answer))
            return 0.0

    def gold_answer(self, sample: Sample) -> str:
        return str(sample.data["answer"])
