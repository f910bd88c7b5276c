"""Reasoning-gym scorers that give full marks to an answer other than their gold: the rule a full
mark must also pass there.

An audit of all 99 datasets (session 20) found scorers whose tolerance admits wrong answers:
number_sorting takes each number within 1 (`-6` for `-6.42`), coin_flip within 1e-4 absolute (`0`
for 3.05e-05), pool_matrix within 1% (`3.8` for `3.78`, where the prompt asks for 2 decimals),
game_of_life ignores extra rows, gsm_symbolic reads the first number (`6 or 7`), time_intervals
the number before any unit (`12 weeks` for `12 days`); spell_backward's and letter_jumble's
prefix scores reach 1 with words added. An answer the package scores 1 that breaks its dataset's
rule scores 0.99 instead: partial credit, not a pass. The rules see answers that are not the gold
written another way (rg_forms maps those onto the gold first).
"""
from __future__ import annotations

import json
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

import numpy as np

MIN_SIGNIFICANT_DIGITS = 3  # coin_flip's prompt states no precision: 0.00195 for 0.001953125, not 0.002


def _same_words(answer: str, gold: str, case_matters: bool) -> bool:
    if not case_matters:
        answer, gold = answer.lower(), gold.lower()
    return answer.split() == gold.split()


def _decimals(text: str) -> list[Decimal] | None:
    """A list of numbers as number_sorting's scorer reads it (JSON after ' -> "), or None."""
    try:
        items = json.loads(text.replace("'", '"'))
        return [Decimal(str(x)) for x in items] if isinstance(items, list) else None
    except (ValueError, TypeError, InvalidOperation, RecursionError):
        return None


def _same_numbers(answer: str, gold: str, entry: dict) -> bool:
    a = _decimals(answer)
    return a is not None and a == _decimals(gold)


def _probability(answer: str, gold: str, entry: dict) -> bool:
    """The exact probability (the entry's rational) as a fraction, or a decimal within half a unit
    of its last place of it, with at least MIN_SIGNIFICANT_DIGITS significant digits."""
    rational = entry["metadata"]["rational"]
    exact = Fraction(rational["numerator"], rational["denominator"])
    text = answer.replace(",", "").strip()
    try:
        if "/" in text:
            return Fraction(text) == exact
        value = Decimal(text)
    except (ValueError, ZeroDivisionError, InvalidOperation):
        return False
    if not value.is_finite() or len(value.as_tuple().digits) > 1000:
        return False
    if Fraction(value) == exact:
        return True
    unit = Fraction(10) ** value.as_tuple().exponent
    return len(value.as_tuple().digits) >= MIN_SIGNIFICANT_DIGITS and abs(Fraction(value) - exact) <= unit / 2


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
    try:
        return json.loads(answer) == json.loads(gold)
    except (ValueError, RecursionError):
        return False


def _one_number(answer: str, gold: str, entry: dict) -> bool:
    """One number in the answer (units around it allowed): '6 or 7' names two."""
    return len(re.findall(r"\d+(?:\.\d+)?", answer.replace(",", ""))) == 1


def _in_days(answer: str, gold: str, entry: dict) -> bool:
    """A date difference ('12 days') answered in days or without a unit; time differences
    ('10:06', '16 days, 22:48') are read whole by the scorer."""
    if not re.fullmatch(r"\d+ days?", gold.strip()):
        return True
    return re.fullmatch(r"[+-]?\d+(?:\s*days?)?\.?", answer.strip(), re.IGNORECASE) is not None


RULES = {
    "number_sorting": _same_numbers,
    "coin_flip": _probability,
    "pool_matrix": _two_decimals,
    "game_of_life": _same_grid,
    "gsm_symbolic": _one_number,
    "time_intervals": _in_days,
    "spell_backward": lambda answer, gold, entry: _same_words(answer, gold, case_matters=False),
    # the prompt keeps the words' capitals: the scorer gave a lower-case answer full marks
    "letter_jumble": lambda answer, gold, entry: _same_words(answer, gold, case_matters=True),
}


def deserves_full_marks(dataset: str, answer: str, gold: str, entry: dict) -> bool:
    """Whether an answer the package's scorer gave 1.0 passes its dataset's rule (module doc);
    `entry` is the sample's reasoning-gym entry."""
    rule = RULES.get(dataset)
    return rule is None or answer == gold or rule(answer, gold, entry)
