"""Reasoning-gym datasets whose full marks a rule here decides: their scorers' tolerances give
wrong answers full marks, or their text comparisons refuse right ones.

An audit of all 99 datasets (session 20) found: number_sorting takes each number within 1 (`-6`
for `-6.42`), coin_flip within 1e-4 absolute (`0` for 3.05e-05) but refuses a probability rounded
up (`0.153` for 0.15274: 0.8), pool_matrix within 1% (`3.8` for `3.78`, where the prompt asks
for 2 decimals), game_of_life ignores extra rows, gsm_symbolic reads the first number (`6 or 7`,
`at least 6`, `-6` for 6), time_intervals the number before any unit (`12 weeks` for `12 days`);
spell_backward's and letter_jumble's prefix scores reach 1 with words added; codeio's input
questions took only the stored input (rg_codeio runs others). There an answer scores 1 when its
rule says it is right, keeps the package's score below 1 (0.99 at most: partial credit, not a
pass) when the rule says it is not, and the package's score when the rule says nothing (None).
Answers that are the gold written another way reach the rules as the gold (rg_forms).
"""
from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import numpy as np

from rci_fast.tasks import rg_codeio
from rci_fast.tasks.answer import decimals_in, parse_number, rounds_to

MIN_SIGNIFICANT_DIGITS = 3  # coin_flip's prompt states no precision: 0.00195 for 0.001953125, not 0.002


def _same_words(answer: str, gold: str, case_matters: bool) -> bool:
    if not case_matters:
        answer, gold = answer.lower(), gold.lower()
    return answer.split() == gold.split()


def _number_list(text: str) -> list[Decimal] | None:
    """A list of numbers as number_sorting's scorer reads it (JSON after ' -> "), or None."""
    try:
        items = json.loads(text.replace("'", '"'), parse_float=Decimal, parse_int=Decimal)
        if not isinstance(items, list) or not all(isinstance(x, (str, Decimal)) for x in items):
            return None
        return [Decimal(x) for x in items]
    except (ValueError, TypeError, InvalidOperation, RecursionError):
        return None


def _same_numbers(answer: str, gold: str, entry: dict) -> bool:
    a = _number_list(answer)
    return a is not None and a == _number_list(gold)


def _probability(answer: str, gold: str, entry: dict) -> bool:
    """The exact probability (the entry's rational) as a fraction, or a decimal within half a unit
    of its last place of it, with at least MIN_SIGNIFICANT_DIGITS significant digits."""
    rational = entry["metadata"]["rational"]
    exact = Fraction(rational["numerator"], rational["denominator"])
    text = answer.replace(",", "").strip()
    value = parse_number(text)  # None for other text or an exponent past answer.MAX_EXPONENT
    if value is None or value == exact or "/" in text:
        return value == exact
    (_, places), = decimals_in(text)
    digits = len(re.sub(r"\D", "", text.lower().partition("e")[0]).lstrip("0"))
    return digits >= MIN_SIGNIFICANT_DIGITS and rounds_to(value, exact, places)


def _two_decimals(answer: str, gold: str, entry: dict) -> bool:
    """Each element of the matrix within half a hundredth of the gold's ("correct to 2 decimal
    places"), read as pool_matrix's scorer reads it."""
    try:
        a = np.loadtxt(answer.splitlines(), dtype=np.float64, ndmin=2)
        g = np.loadtxt(gold.splitlines(), dtype=np.float64, ndmin=2)
    except ValueError:
        return False
    return a.shape == g.shape and bool(np.all(np.abs(a - g) <= 0.005 + 1e-9))


def _same_grid(answer: str, gold: str, entry: dict) -> bool:
    """The gold's cells, as JSON writes them (true or 1.0 is not 1)."""
    try:
        return json.dumps(json.loads(answer)) == json.dumps(json.loads(gold))
    except (ValueError, RecursionError):
        return False


def _the_number(answer: str, gold: str, entry: dict) -> bool:
    """The gold's value and nothing else (the prompt: "Do not include units"; a dollar sign aside)."""
    text = answer.replace(",", "").strip().removeprefix("$").strip()
    if not re.fullmatch(r"[+-]?\d+(?:\.\d+)?", text):
        return False
    return Decimal(text) == Decimal(gold.strip())


def _in_days(answer: str, gold: str, entry: dict) -> bool | None:
    """A date difference ('12 days') in days or without a unit; the scorer reads time differences
    ('10:06', '16 days, 22:48') whole (None: its verdict stands)."""
    days = re.fullmatch(r"(\d+) days?", gold.strip())
    if days is None:
        return None
    got = re.fullmatch(r"\+?(\d+)(?:\s*days?)?\.?", answer.strip(), re.IGNORECASE)
    return got is not None and int(got.group(1)) == int(days.group(1))


RULES = {
    "number_sorting": _same_numbers,
    "coin_flip": _probability,
    "pool_matrix": _two_decimals,
    "game_of_life": _same_grid,
    "gsm_symbolic": _the_number,
    "time_intervals": _in_days,
    # an input that gives the stated output, run in the sandbox (the package knows only its own)
    "codeio": lambda answer, gold, entry: True if rg_codeio.is_feasible_input(answer, entry) else None,
    "spell_backward": lambda answer, gold, entry: _same_words(answer, gold, case_matters=False),
    # the prompt keeps the words' capitals: the scorer gave a lower-case answer full marks
    "letter_jumble": lambda answer, gold, entry: _same_words(answer, gold, case_matters=True),
}


def full_marks(dataset: str, answer: str, gold: str, entry: dict) -> bool | None:
    """Whether the answer is right by its dataset's rule (module doc); None where no rule decides.
    `entry` is the sample's reasoning-gym entry."""
    rule = RULES.get(dataset)
    if rule is None:
        return None
    return True if answer == gold else rule(answer, gold, entry)
