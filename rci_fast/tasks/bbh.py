"""BIG-Bench Hard: 27 tasks, one JSON file each in <data_dir>/bbh/ ({"examples": [{input, target}]}).

Answers are judged by exact match after a normalisation chosen per answer kind:
  choice     '(B)', 'B', '(b)', 'B) text' all mean option B; a hedge ('(B) or (C)') means none;
             a target that is not a letter (three published samples whose options were split on
             commas) is matched as text.
  yes/no, True/False, valid/invalid   case-, quote- and punctuation-insensitive.
  number     numeric equality ('24', '24.0', '+24').
  tokens     word_sorting: the word sequence; dyck_languages: the closing brackets, spaces ignored.
"""
from __future__ import annotations

import json
import re

from rci_fast.tasks.answer import normalize_text, numbers_equal, parse_number, strip_wrapping
from rci_fast.tasks.base import Sample, Task, TaskDataError, resolve_data_dir

TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa",
    "dyck_languages", "formal_fallacies", "geometric_shapes", "hyperbaton",
    "logical_deduction_five_objects", "logical_deduction_seven_objects",
    "logical_deduction_three_objects", "movie_recommendation", "multistep_arithmetic_two",
    "navigate", "object_counting", "penguins_in_a_table", "reasoning_about_colored_objects",
    "ruin_names", "salient_translation_error_detection", "snarks", "sports_understanding",
    "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects",
    "web_of_lies", "word_sorting",
)

_ANSWER_KIND = {
    "boolean_expressions": "word", "causal_judgement": "word", "formal_fallacies": "word",
    "navigate": "word", "sports_understanding": "word", "web_of_lies": "word",
    "multistep_arithmetic_two": "number", "object_counting": "number",
    "dyck_languages": "brackets", "word_sorting": "words",
}  # every other task is multiple choice

_FORMAT_HINT = {
    "choice": "the option letter, e.g. <<<(A)>>>",
    "number": "a number, e.g. <<<42>>>",
    "brackets": "the closing brackets separated by spaces, e.g. <<<] ) }>>>",
    "words": "the sorted words separated by spaces, e.g. <<<apple banana cherry>>>",
}
_WORD_HINTS = {
    "boolean_expressions": "<<<True>>> or <<<False>>>", "formal_fallacies": "<<<valid>>> or <<<invalid>>>",
    "sports_understanding": "<<<yes>>> or <<<no>>>",
}

_CHOICE_RE = re.compile(r"^\(?([A-Z])\)?(?:[\s.:)].*)?$", re.DOTALL)
_LOWER_CHOICE_RE = re.compile(r"^\(?([a-z])\)?$")          # 'b' or '(b)', not 'a dog'
# A second option named after the first hedges between them: right after the letter ('B and C',
# 'B. Or c', 'B/C', 'B, C'), or anywhere as '(C)' or 'or C' (not 'and I' in an option's text).
_HEDGE_AFTER_LETTER_RE = re.compile(r"\)?\s*[.,]?\s*(?:or|and|&|/|,)\s*\(?[A-Za-z]\)?(?:$|[\s.,;:!?])", re.I)
_OTHER_OPTION_RE = re.compile(r"\([A-Za-z]\)|\b[Oo][Rr]\s+\(?[A-Z]\b")


def _choice_letter(s: str) -> str | None:
    """The one option letter an answer names ('(B)', 'B) Sat', 'b'), or None (also for a hedge
    that names two)."""
    s = strip_wrapping(s)
    if m := _LOWER_CHOICE_RE.match(s):
        return m.group(1).upper()
    m = _CHOICE_RE.match(s)
    if m is None or _HEDGE_AFTER_LETTER_RE.match(s, m.end(1)) or _OTHER_OPTION_RE.search(s, m.end(1)):
        return None
    return m.group(1)


class BBHTask(Task):
    source = "bbh"
    verifier = "exact"

    def __init__(self, task: str, data_dir=None):
        super().__init__(f"bbh/{task}")
        self.task = task
        self.kind = _ANSWER_KIND.get(task, "choice")
        self.path = resolve_data_dir(data_dir) / "bbh" / f"{task}.json"

    def _load_samples(self) -> list[Sample]:
        try:
            with open(self.path) as f:
                examples = json.load(f)["examples"]
        except FileNotFoundError:
            raise TaskDataError(f"BBH file not found: {self.path}") from None
        except (json.JSONDecodeError, KeyError) as e:
            raise TaskDataError(f"{self.path}: not a BBH task file ({e})") from None
        hint = _WORD_HINTS.get(self.task, "<<<Yes>>> or <<<No>>>") if self.kind == "word" \
            else _FORMAT_HINT[self.kind]
        suffix = f"\n\nGive your final answer as {hint}."
        return [Sample(id=str(i), prompt=ex["input"] + suffix, data=ex, task=self.name)
                for i, ex in enumerate(examples)]

    def check(self, sample: Sample, answer: str) -> bool:
        target = sample.data["target"]
        if self.kind == "choice":
            gold = _choice_letter(target)
            if gold is None:  # a text target (options split on commas in the published data)
                return normalize_text(answer) == normalize_text(target)
            return _choice_letter(answer) == gold
        if self.kind == "word":
            return normalize_text(answer).rstrip("!.") == normalize_text(target)
        if self.kind == "number":
            return numbers_equal(parse_number(answer), parse_number(target), rel=0.0)
        if self.kind == "brackets":
            return re.sub(r"[\s,]", "", strip_wrapping(answer)) == re.sub(r"\s", "", target)
        # words: the order matters, separators (spaces or commas) and case do not
        return re.split(r"[\s,]+", normalize_text(answer)) == re.split(r"\s+", target.lower())

    def gold_answer(self, sample: Sample) -> str:
        return sample.data["target"]
