"""A scripted teacher: multi-turn SFT trajectories for procedurally generated tasks, without a model.

For each sample of a family (a reasoning-gym dataset) the teacher writes a real Python solution
from the problem's inputs (never from its answer), runs it in the sandbox, and builds the
conversation from what the interpreter actually printed; the final answer is read off that
output. Three styles teach when code helps:
  code   one code call, then the answer
  check  a code call, then a second one that checks the result (substitute back, re-evaluate,
         verify divisibility ...), then the answer
  text   no code: the teacher reasons in words on small inputs (the host computes the words)
  direct no code, any input: the teacher states the answer as a strong model answering from memory
         would (the host runs the code plan unseen to know it); off unless `direct_share` > 0. A
         small student cannot imitate it, so RL has to learn that code pays: the mix of habits a
         teacher such as GPT-4o brings into the paper's SFT data.
Every trajectory is scored with the task's own verifier and kept only when it scores 1.0
(rejection sampling, as the paper did with GPT-4o's trajectories).
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

from rci_fast.tasks.prompt import build_messages, format_result
from rci_fast.tasks.registry import load_task
from rci_fast.tasks.trajectory import SFTTrajectory

Outputs = list  # stdout of each code call so far, in order
Step = Callable[[Outputs], tuple[str, str]]  # -> (what the teacher says, the code it writes)


@dataclass
class Plan:
    steps: list[Step]                    # code turns, each may read the earlier outputs
    final: Callable[[Outputs], str]      # the last assistant turn, with <<<answer>>>


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _answer_from_output(lead: str = "The interpreter prints") -> Callable[[Outputs], str]:
    return lambda out: f"{lead} {last_line(out[0])}, so the answer is <<<{last_line(out[0])}>>>"


def _checked_answer(out: Outputs) -> str:
    return (f"The check prints {last_line(out[1])}, so the result {last_line(out[0])} holds. "
            f"<<<{last_line(out[0])}>>>")


def _plan(style: str, first: Step, check: Step | None = None, final=None) -> Plan:
    if style == "check" and check is not None:
        return Plan([first, check], _checked_answer)
    return Plan([first], final or _answer_from_output())


# --- families -----------------------------------------------------------------------------------
def plan_expression(meta, style):  # basic_arithmetic, chain_sum: integer expressions
    expr = meta["expression"]
    if style == "text":
        tokens = expr.split()
        value, steps = int(tokens[0]), []
        for op, num in zip(tokens[1::2], tokens[2::2]):
            new = value + int(num) if op == "+" else value - int(num)
            steps.append(f"{value} {op} {num} = {new}")
            value = new
        return Plan([], lambda out: "Step by step: " + "; ".join(steps) + f". <<<{value}>>>")
    if "/" in expr:  # the prompt asks for floor division (rg.PROMPT_NOTES)
        floor_expr = expr.replace("/", "//")
        return _plan("code", lambda out: ("The task wants / as floor division, so I write // in Python.",
                                          f"print({floor_expr})"))
    first = lambda out: ("I'll let Python evaluate the expression exactly.", f"print({expr})")
    check = lambda out: ("Let me double-check with exact fractions, so no float rounding hides an error.",
                         "from fractions import Fraction\nimport re\n"
                         f"expr = {expr!r}\n"
                         "exact = eval(re.sub(r'(\\d+)', r'Fraction(\\1)', expr))\n"
                         f"print(exact == {last_line(out[0])}, exact)")
    return _plan(style, first, check)


def plan_decimal_chain_sum(meta, style):
    expr = re.sub(r"(\d+\.\d+|\d+)", r'Decimal("\1")', meta["expression"])
    first = lambda out: ("Decimal arithmetic keeps every digit exact.",
                         f"from decimal import Decimal\nprint({expr})")
    return _plan(style, first)


def plan_gcd(meta, style):
    nums = meta["numbers"]
    first = lambda out: ("I'll compute it with math.gcd.", f"import math\nnumbers = {nums}\nprint(math.gcd(*numbers))")
    check = lambda out: ("Check: the GCD divides every number and the quotients share no factor.",
                         f"import math\nnumbers = {nums}\ng = {last_line(out[0])}\n"
                         "quotients = [n // g for n in numbers]\n"
                         "print(all(n % g == 0 for n in numbers) and math.gcd(*quotients) == 1, quotients)")
    return _plan(style, first, check)


def plan_lcm(meta, style):
    nums = meta["numbers"]
    first = lambda out: ("math.lcm gives the least common multiple.", f"import math\nprint(math.lcm(*{nums}))")
    check = lambda out: ("Check: it is a multiple of every number and no smaller common multiple exists.",
                         f"numbers = {nums}\nm = {last_line(out[0])}\n"
                         "smallest = next(k for k in range(max(numbers), m + 1, max(numbers)) "
                         "if all(k % n == 0 for n in numbers))\n"
                         "print(all(m % n == 0 for n in numbers) and smallest == m)")
    return _plan(style, first, check)


def plan_base_conversion(meta, style):
    src, base_in, base_out = meta["source_repr"], meta["source_base"], meta["target_base"]
    first = lambda out: (f"Convert through an integer: parse in base {base_in}, then divide repeatedly by {base_out}.",
                         f'value = int("{src}", {base_in})\n'
                         'digits = "0123456789abcdefghijklmnopqrstuvwxyz"\n'
                         'n, text = value, ""\n'
                         f"while n:\n    n, r = divmod(n, {base_out})\n    text = digits[r] + text\n"
                         'print(text or "0")')
    check = lambda out: ("Check: both representations must name the same integer.",
                         f'print(int("{last_line(out[0])}", {base_out}) == int("{src}", {base_in}))')
    return _plan(style, first, check)


def plan_letter_counting(meta, style):
    words, letter = meta["span"], meta["target_letter"]
    if style == "text":
        counts = [(w, w.lower().count(letter)) for w in words]
        total = sum(c for _, c in counts)
        listed = ", ".join(f"{w} {c}" for w, c in counts if c)
        return Plan([], lambda out: f'Counting "{letter}" word by word (ignoring case): {listed}. '
                                    f"Total: <<<{total}>>>")
    text = " ".join(words)
    first = lambda out: ("Counting characters is error-prone by eye; Python counts them exactly (case-insensitive).",
                         f'text = {text!r}\nprint(text.lower().count("{letter}"))')
    return _plan(style, first)


def plan_spell_backward(meta, style):
    word = meta["word"]
    if style == "text":
        return Plan([], lambda out: f"Reading {word} from the last letter to the first: <<<{word[::-1]}>>>")
    first = lambda out: ("Reversing with a slice avoids slips.", f"print({word!r}[::-1])")
    return _plan(style, first)


def plan_simple_equations(meta, style):
    var = meta["variable"]
    lhs, rhs = (s.strip() for s in meta["equation"].split("="))
    first = lambda out: ("I'll solve it with sympy.",
                         f"from sympy import Eq, solve, symbols, sympify\n{var} = symbols({var!r})\n"
                         f"[solution] = solve(Eq(sympify({lhs!r}), sympify({rhs!r})), {var})\nprint(solution)")
    check = lambda out: ("Substitute the solution back into the equation to check it.",
                         f"from sympy import sympify, symbols\n{var} = symbols({var!r})\n"
                         f"print(sympify({lhs!r}).subs({var}, {last_line(out[0])}) == sympify({rhs!r}))")
    return _plan(style, first, check)


def plan_puzzle24(meta, style):
    nums = meta["numbers"]
    first = lambda out: ("I'll search all orders, operators and bracketings with exact fractions.",
                         "from fractions import Fraction\nfrom itertools import permutations, product\n"
                         f"numbers = {nums}\n"
                         "def exprs(ns):\n"
                         "    if len(ns) == 1:\n"
                         "        yield str(ns[0]), Fraction(ns[0])\n"
                         "        return\n"
                         "    for i in range(1, len(ns)):\n"
                         "        for (a, va), (b, vb) in product(exprs(ns[:i]), exprs(ns[i:])):\n"
                         "            yield f'({a} + {b})', va + vb\n"
                         "            yield f'({a} - {b})', va - vb\n"
                         "            yield f'({a} * {b})', va * vb\n"
                         "            if vb != 0:\n"
                         "                yield f'({a} / {b})', va / vb\n"
                         "found = next((e for p in permutations(numbers) for e, v in exprs(list(p)) if v == 24), None)\n"
                         "print(found[1:-1] if found else 'no solution')")
    check = lambda out: ("Let me evaluate the expression on its own to confirm it gives 24.",
                         f"print(eval({last_line(out[0])!r}))")
    return _plan(style, first, check)


def plan_caesar_cipher(meta, style):
    cipher = meta["cipher_text"]
    first = lambda out: ("I'll try all 25 shifts and keep the one whose letters look most like English "
                         "(chi-squared against English letter frequencies).",
                         f"cipher = {cipher!r}\n"
                         "freq = dict(zip('ETAOINSHRDLCUMWFGYPBVKJXQZ', [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, "
                         "4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0, 1.9, 1.5, 1.0, 0.8, 0.15, 0.15, 0.1, 0.07]))\n"
                         "def shift(text, k):\n"
                         "    return ''.join(chr((ord(c) - 65 - k) % 26 + 65) if c.isalpha() else c for c in text)\n"
                         "def badness(text):\n"
                         "    letters = [c for c in text if c.isalpha()]\n"
                         "    return sum((letters.count(c) - len(letters) * f / 100) ** 2 / (len(letters) * f / 100)\n"
                         "               for c, f in freq.items())\n"
                         "best = min(range(26), key=lambda k: badness(shift(cipher, k)))\n"
                         "print(shift(cipher, best))")
    return _plan(style, first)


def plan_count_bits(meta, style):
    n = meta["number"]
    first = lambda out: ("bin() shows the bits; count the ones.", f"print(bin({n}).count('1'))")
    return _plan(style, first)


def plan_fraction_simplification(meta, style):
    num, den = meta["numerator"], meta["denominator"]
    first = lambda out: ("Fraction reduces by the GCD automatically.",
                         f"from fractions import Fraction\nf = Fraction({num}, {den})\nprint(f'{{f.numerator}}/{{f.denominator}}')")
    check = lambda out: ("Check: same value, and numerator and denominator share no factor.",
                         f"import math\np, q = map(int, {last_line(out[0])!r}.split('/'))\n"
                         f"print(p * {den} == q * {num} and math.gcd(p, q) == 1)")
    return _plan(style, first, check)


def plan_isomorphic_strings(meta, style):
    a, b = meta["words"]
    first = lambda out: ("Two strings are isomorphic when the character mapping is one-to-one both ways.",
                         f"a, b = {a!r}, {b!r}\n"
                         "ok = len(a) == len(b) and len(set(zip(a, b))) == len(set(a)) == len(set(b))\nprint(ok)")
    return _plan(style, first)


def plan_ransom_note(meta, style):
    note, magazine = meta["ransom_note"], meta["magazine"]
    first = lambda out: ("Compare letter counts: the magazine must have every letter the note needs.",
                         f"from collections import Counter\nprint(not (Counter({note!r}) - Counter({magazine!r})))")
    return _plan(style, first)


@dataclass(frozen=True)
class Family:
    plan: Callable[[dict, str], Plan]
    styles: tuple[str, ...]                      # the styles this family can be written in
    text_ok: Callable[[dict], bool] = lambda meta: False   # when a text-only answer is sensible


FAMILIES: dict[str, Family] = {
    "basic_arithmetic": Family(plan_expression, ("code", "check")),
    "chain_sum": Family(plan_expression, ("code", "check", "text"),
                        lambda m: m["num_terms"] <= 4 and m["num_digits"] <= 2),
    "decimal_chain_sum": Family(plan_decimal_chain_sum, ("code",)),
    "gcd": Family(plan_gcd, ("code", "check")),
    "lcm": Family(plan_lcm, ("code", "check")),
    "base_conversion": Family(plan_base_conversion, ("code", "check")),
    "letter_counting": Family(plan_letter_counting, ("code", "text"), lambda m: len(m["span"]) <= 8),
    "spell_backward": Family(plan_spell_backward, ("code", "text"), lambda m: len(m["word"]) <= 12),
    "simple_equations": Family(plan_simple_equations, ("code", "check")),
    "puzzle24": Family(plan_puzzle24, ("code", "check")),
    "caesar_cipher": Family(plan_caesar_cipher, ("code",)),
    "count_bits": Family(plan_count_bits, ("code",)),
    "fraction_simplification": Family(plan_fraction_simplification, ("code", "check")),
    "isomorphic_strings": Family(plan_isomorphic_strings, ("code",)),
    "ransom_note": Family(plan_ransom_note, ("code",)),
}
STYLE_WEIGHTS = {"code": 0.5, "check": 0.3, "text": 0.3}


def choose_style(family: Family, meta: dict, rng: random.Random) -> str:
    styles = [s for s in family.styles if s != "text" or family.text_ok(meta)]
    return rng.choices(styles, weights=[STYLE_WEIGHTS[s] for s in styles])[0]


def _code_turn(text: str, code: str) -> str:
    return f"{text}\n```python\n{code}\n```"


def run_plan(plan: Plan, sandbox, timeout_s: float = 10.0) -> tuple[list[dict], Outputs]:
    """Executes the plan's code turns in the sandbox; returns the assistant/tool messages."""
    messages, outputs = [], []
    for step in plan.steps:
        text, code = step(outputs)
        result = sandbox.run(code, timeout_s=timeout_s)
        messages.append({"role": "assistant", "content": _code_turn(text, code)})
        messages.append({"role": "tool", "content": format_result(result.stdout, result.stderr, result.status,
                                                                   timeout_s=timeout_s)})
        outputs.append(result.stdout if result.status == "ok" else "")
    messages.append({"role": "assistant", "content": plan.final(outputs)})
    return messages, outputs


def direct_answer(family: Family, meta: dict, sandbox, timeout_s: float) -> list[dict]:
    """The "direct" style: one assistant turn that states the answer without code."""
    _, outputs = run_plan(family.plan(meta, "code"), sandbox, timeout_s)  # unseen by the student
    return [{"role": "assistant", "content": f"I can answer this one directly. <<<{last_line(outputs[0])}>>>"}]


def generate(sandbox, families: list[str] | None = None, per_family: int = 20, seed: int = 0,
             split: str = "train", timeout_s: float = 10.0, keep_wrong: bool = False,
             direct_share: float = 0.0):
    """Yields SFTTrajectory objects, per_family samples of each family (correct ones only unless
    keep_wrong). Samples come from the family's reasoning-gym task, `split` part, generated with
    the task's fixed seeds; `seed` drives the choice of styles; a `direct_share` of the samples
    are answered in the "direct" style (no code)."""
    if not 0.0 <= direct_share <= 1.0:
        raise ValueError(f"direct_share must be in [0, 1], got {direct_share}")
    for name in families or sorted(FAMILIES):
        family = FAMILIES[name]
        task = load_task(f"rg/{name}", train_size=per_family, validation_size=per_family)
        rng = random.Random(f"{seed}/{name}")
        for sample in task.samples(split)[:per_family]:
            meta = sample.data["metadata"]
            if direct_share and rng.random() < direct_share:
                style, body = "direct", direct_answer(family, meta, sandbox, timeout_s)
            else:
                style = choose_style(family, meta, rng)
                body, _ = run_plan(family.plan(meta, style), sandbox, timeout_s)
            score = task.score(sample, body[-1]["content"])
            if score < 1.0 and not keep_wrong:
                continue
            yield SFTTrajectory(messages=build_messages(sample.prompt) + body, task=task.name,
                                sample_id=sample.id, score=score, source=f"scripted:{style}")
