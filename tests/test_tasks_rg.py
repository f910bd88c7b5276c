"""Reasoning-Gym through the registry: each registered dataset's own reference answer scores 1.0,
a wrong answer scores below 1, generation is seeded and deterministic."""
import json
import re
import os
import subprocess
import sys
import time
import warnings
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

from rci_fast.tasks import list_tasks, load_task
from rci_fast.tasks import rg_codeio, rg_forms
from rci_fast.tasks.answer import extract_answer
from rci_fast.tasks.rg import LEFT_OUT

RG = list_tasks("rg")


def test_left_out_datasets_are_not_registered_and_explained():
    assert not {f"rg/{d}" for d in LEFT_OUT} & set(RG)
    assert all(len(reason) > 20 for reason in LEFT_OUT.values())


@pytest.mark.parametrize("name", RG)
def test_reference_answers_score_one_and_junk_does_not(name):
    task = load_task(name, train_size=3, validation_size=2)
    samples = task.samples()
    assert 1 <= len(samples) <= 5
    for s in samples:
        assert s.prompt.startswith(s.data["question"]) and "<<<" in s.prompt
        assert task.score(s, f"I computed it.\n<<<{task.gold_answer(s)}>>>") == 1.0, (s.id, s.data["answer"])
        assert task.score(s, "<<<zzz not an answer>>>") < 1.0
        assert task.score(s, "no answer tags at all") == 0.0


def test_generation_is_seeded_and_splits_do_not_overlap():
    a = load_task("rg/basic_arithmetic", train_size=20, validation_size=10)
    b = load_task("rg/basic_arithmetic", train_size=20, validation_size=10)
    assert [s.prompt for s in a.samples()] == [s.prompt for s in b.samples()]
    train = {s.data["question"] for s in a.samples("train")}
    assert not train & {s.data["question"] for s in a.samples("validation")}
    assert len(a.samples("train")) == 20


def test_scorer_errors_count_as_wrong():
    task = load_task("rg/prime_factorization", train_size=1, validation_size=0)
    [s] = task.samples()
    assert task.score(s, "<<<not a number>>>") == 0.0  # the package itself raises ValueError here


def test_basic_arithmetic_prompt_states_floor_division():
    task = load_task("rg/basic_arithmetic", train_size=40, validation_size=0)
    uneven = next(s for s in task.samples("train") if s.data["metadata"]["expression"]
                  == "( 412 - -864 ) / -( -( 318 - -345 ) + -662 )")  # 1276 / 1325
    assert uneven.data["answer"] == "0" and "//" in uneven.prompt
    assert task.score(uneven, "<<<0>>>") == 1.0


DIGEST = """import hashlib, json, sys
from rci_fast.tasks.rg import ReasoningGymTask, list_rg_tasks
out = {}
for name in list_rg_tasks():
    task = ReasoningGymTask(name, train_size=5, validation_size=5)
    text = json.dumps([(s.prompt, str(s.data.get("answer"))) for s in task.samples()], default=str)
    out[name] = hashlib.sha1(text.encode()).hexdigest()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_samples_do_not_depend_on_the_string_hash_seed():
    """Every registered dataset gives the same samples in processes with different PYTHONHASHSEEDs
    (HASH_DEPENDENT ones through a child with a fixed seed): a demo that resumes in a new process,
    and every rank of a run, see the same questions."""
    procs = [subprocess.Popen([sys.executable, "-c", DIGEST], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONHASHSEED=seed)) for seed in ("1", "2")]
    digests = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    assert len(digests[0]) == len(list_tasks(source="rg")) > 90
    assert [name for name in digests[0] if digests[0][name] != digests[1][name]] == []


# Answers that reasoning-gym's own scorers would evaluate (eval / sympy's parse_expr): code,
# an exit, numbers that take forever. Aimed at the test's own scratch file only.
HOSTILE_ANSWERS = ["__import__('pathlib').Path({marker!r}).touch()", "exit()", "9**9**9", "((9**99)**99)**99",
                   "[x for x in iter(int, 1)]", "N(E, 10**9)", "x**99999", "setattr(type(self), 'score_answer', 1)",
                   "pi.n(999999999)", "((((9*x)**99)**99)**99)**99", "x*(a+b+c+d+e+f)**20", "x.\uff46\uff55\uff4e\uff43"]


def test_model_text_is_never_evaluated_by_the_scorers(tmp_path):
    import time

    from rci_fast.tasks.rg import EVALUATED_ANSWERS

    marker = str(tmp_path / "ran")
    for dataset in EVALUATED_ANSWERS:
        task = load_task(f"rg/{dataset}")
        samples = task.samples("train")[:20]
        start = time.monotonic()
        for answer in HOSTILE_ANSWERS:
            assert task.score_answer(samples[0], answer.format(marker=marker)) == 0.0, (dataset, answer)
        assert time.monotonic() - start < 2.0 and not os.path.exists(marker), dataset
        assert all(task.score_answer(s, task.gold_answer(s)) == 1.0 for s in samples), dataset
    integration = load_task("rg/simple_integration")  # the question restated scores nothing
    sample = integration.samples("train")[0]
    assert integration.score_answer(sample, f"Integral({sample.data['metadata']['integrand']}, x)") == 0.0
    spiral = load_task("rg/spiral_matrix")
    sample = spiral.samples("train")[0]
    as_list = "[" + ", ".join(spiral.gold_answer(sample).split()) + "]"
    assert spiral.score_answer(sample, as_list) == 0.1  # the package's partial credit still works


def test_a_slow_admitted_answer_is_cut_off_and_scores_zero(caplog, monkeypatch):
    """A product of 16 admitted factors took sympy 4-6 s to differentiate (40 would take minutes):
    scoring stops at the limit, the answer scores 0, the alarm is gone afterwards."""
    import signal
    import time

    from rci_fast.tasks import rg

    monkeypatch.setattr(rg, "EVALUATED_ANSWER_TIME_LIMIT_S", 0.3)
    task = load_task("rg/intermediate_integration")
    sample = task.samples("train")[0]
    slow = "*".join(f"(x+{i})**4" for i in range(1, 17))
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="rci_fast.tasks"):
        assert task.score_answer(sample, slow) == 0.0
    assert time.monotonic() - start < 1.5 and "took over" in caplog.text
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    assert task.score_answer(sample, task.gold_answer(sample)) == 1.0
    # A timer already running (pytest-timeout's) is put back with the time it had left.
    outer = lambda signum, frame: None  # noqa: E731
    signal.signal(signal.SIGALRM, outer)
    signal.setitimer(signal.ITIMER_REAL, 30.0)
    try:
        assert task.score_answer(sample, slow) == 0.0
        assert 28.0 < signal.getitimer(signal.ITIMER_REAL)[0] < 30.0 and signal.getsignal(signal.SIGALRM) is outer
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def test_full_marks_need_the_gold_itself_where_the_package_gives_more():
    for dataset, extra in (("spell_backward", " xyz"), ("letter_jumble", " extra words here")):
        task = load_task(f"rg/{dataset}")
        for s in task.samples("train")[:40]:
            gold = task.gold_answer(s)
            assert task.score_answer(s, gold) == 1.0 and task.score_answer(s, gold.upper()) in (0.99, 1.0)
            assert task.score_answer(s, gold + extra) < 1.0, (dataset, gold)


def _near_and_right(dataset: str, s) -> tuple[list[str], list[str]]:
    """Answers other than the gold that dataset's scorer may give full marks: wrong ones (within
    its tolerance) and right ones (the gold to the precision asked, with a unit, ...)."""
    gold = s.data["answer"]
    if dataset == "number_sorting":
        numbers = [Decimal(x) for x in json.loads(gold.replace("'", '"'))]
        rounded = [Decimal(round(x)) for x in numbers]
        near = [json.dumps(list(map(str, rounded)))] if rounded != numbers else []
        near.append("[" + ", ".join(f"{x}000000000000000000001" if "." in str(x) else f"{x}.000000000000000000001"
                                    for x in numbers) + "]")  # equal as floats
        return (near,
                ["[" + ", ".join(map(str, numbers)) + "]"])
    if dataset == "coin_flip":
        exact = Fraction(s.data["metadata"]["rational"]["numerator"], s.data["metadata"]["rational"]["denominator"])
        return ([x for x in (f"{float(gold) + 9e-5:.6f}", f"{float(exact):.1g}", "0") if Fraction(x) != exact],
                [f"{exact.numerator}/{exact.denominator}", f"{float(exact):.4g}", f"{float(exact):.12f}",
                 f"{Decimal(float(exact)):.3g}", f"{float(exact):.2e}"])  # rounded up too: the package gave 0.8
    if dataset == "pool_matrix":
        rows = [[float(x) for x in line.split()] for line in gold.splitlines()]
        m, k = np.array(s.data["metadata"]["matrix"]), s.data["metadata"]["pool_size"]
        pool = np.mean if s.data["metadata"]["pool_type"] == "average" else np.max
        exact = [[pool(m[i:i + k, j:j + k]) for j in range(0, m.shape[1], k)] for i in range(0, m.shape[0], k)]
        return (["\n".join(" ".join(f"{x * 1.009:.2f}" for x in row) for row in rows)],
                ["\n".join(" ".join(f"{x:.4f}" for x in row) for row in exact)])
    if dataset == "game_of_life":
        grid = json.loads(gold)
        as_bools = json.dumps([[bool(x) for x in row] for row in grid])
        return [json.dumps(grid + [[0] * len(grid[0])]), as_bools], [json.dumps(grid, indent=1)]
    if dataset == "gsm_symbolic":
        return ([f"{gold} or {int(gold) + 1}", f"{gold}, maybe {int(gold) * 2}", f"-{gold}" if int(gold) else "-1", f"at least {gold}",
                 f"{gold} or seven"], [f"${gold}", f"{gold}.00", f"+{gold}"])
    if dataset == "time_intervals" and re.fullmatch(r"\d+ days", gold):
        days = gold.split()[0]
        return [f"{days} weeks", f"{days} days and 4 hours"], [days, f"{days} day", f"{days} Days"]
    return [], []


@pytest.mark.parametrize("dataset", ["number_sorting", "coin_flip", "pool_matrix", "game_of_life",
                                     "gsm_symbolic", "time_intervals"])
def test_full_marks_only_within_the_precision_the_question_asks(dataset):
    """The package's own scorer gives these wrong answers full marks (asserted: the rule is
    needed); rg_full_marks takes them down to partial credit, and gives right ones full marks
    (coin_flip rounded up scored 0.8)."""
    task = load_task(f"rg/{dataset}", train_size=40, validation_size=1)
    tested = 0
    for s in task.samples("train"):
        near, right = _near_and_right(dataset, s)
        for answer in near:
            if task._scorer.score_answer(answer, s.data) == 1.0:
                assert task.score_answer(s, answer) < 1.0, (dataset, s.data["answer"], answer)
                tested += 1
        for answer in right:
            assert task.score_answer(s, answer) == 1.0, (dataset, s.data["answer"], answer)
        assert task.score_answer(s, task.gold_answer(s)) == 1.0
    assert tested >= 5, (dataset, tested)


def _same_output_inputs(code: str, inputs: dict, output) -> tuple[list[dict], list[dict]]:
    """Inputs one change away from the stored one (a number +-1 or doubled, a string or list
    reversed, a string's case) that give the same output, and some that give another: found by
    running the package's own reference code here (trusted code; answers go to the sandbox)."""
    namespace: dict = {}
    with warnings.catch_warnings():  # the package's code has invalid escapes ('\\d')
        warnings.simplefilter("ignore", DeprecationWarning)
        exec(compile(code, "<codeio reference>", "exec"), namespace)
    same, other = [], []
    for key, value in inputs.items():
        if isinstance(value, bool):
            changes = [not value]
        elif isinstance(value, (int, float)):
            changes = [value + 1, value - 1, value * 2]
        elif isinstance(value, (str, list)):
            changes = [value[::-1]] + ([value.upper(), value.lower()] if isinstance(value, str) else [])
        else:
            changes = []
        for changed in changes:
            candidate = dict(inputs, **{key: changed})
            if changed == value:
                continue
            try:
                result = json.loads(json.dumps(namespace["main_solution"](**candidate)))
            except Exception:
                continue
            (same if result == json.loads(json.dumps(output)) else other).append(candidate)
    return same, other


def test_codeio_takes_any_input_that_gives_the_stated_output():
    """codeio asks for "a feasible input"; the package gives full marks only to the input it
    stored. Another that the reference code (run in the sandbox) maps to the stated output scores
    1, one that it maps elsewhere, one with other keys or not JSON does not."""
    task = load_task("rg/codeio", train_size=60, validation_size=1)
    found = refused = 0
    for s in task.samples("train"):
        if not rg_codeio.asks_for_an_input(s.data):
            continue
        meta = s.data["metadata"]
        code = s.data["question"].split(rg_codeio.CODE_MARK, 1)[1].split("\n", 1)[1]
        same, other = _same_output_inputs(code, meta["input_data"], meta["output_data"])
        for inputs in same[:1]:
            answer = json.dumps(inputs)
            assert task._scorer.score_answer(answer, s.data) < 1.0  # the package's verdict
            assert task.score(s, f"<<<{answer}>>>") == 1.0, (s.id, answer)
            found += 1
        for inputs in other[:1]:
            assert task.score(s, f"<<<{json.dumps(inputs)}>>>") < 1.0, (s.id, inputs)
            refused += 1
        wrong_keys = json.dumps({**meta["input_data"], "extra": 1})
        assert task.score(s, f"<<<{wrong_keys}>>>") < 1.0 and task.score(s, "<<<{not json>>>") < 1.0
    assert found >= 5 and refused >= 5, (found, refused)


def _codeio_entry(code: str, inputs: dict, output) -> dict:
    question = (f"{rg_codeio.INPUT_QUESTION} without writing any code?\n\n{rg_codeio.CODE_MARK} You can "
                f"refer to this code.\n\n{code}\n")
    return {"question": question, "answer": json.dumps(inputs),
            "metadata": {"input_data": inputs, "output_data": output}}


def test_codeio_feasible_inputs_keep_the_stored_kinds_and_a_reproducible_program():
    parity = "def main_solution(n, tag):\n    return {'odd': n % 2 == 1, 'tag': len(tag)}\n"
    entry = _codeio_entry(parity, {"n": 7, "tag": "ab"}, {"odd": True, "tag": 2})
    assert rg_codeio.is_feasible_input('{"n": 9, "tag": "xy"}', entry)
    assert not rg_codeio.is_feasible_input('{"n": 8, "tag": "xy"}', entry)  # another output
    assert not rg_codeio.is_feasible_input('{"n": 9.0, "tag": "xy"}', entry)  # a float for an int
    assert not rg_codeio.is_feasible_input('{"n": true, "tag": "xy"}', entry)  # True % 2 == 1 in Python
    assert not rg_codeio.is_feasible_input('{"n": 9, "tag": ["x", "y"]}', entry)  # len 2, not a string
    assert not rg_codeio.is_feasible_input('{"n": 9}', entry) and not rg_codeio.is_feasible_input("[9]", entry)
    assert rg_codeio._same_kinds({"a": [1.5, 2]}, {"a": [0.5]}) and rg_codeio._same_kinds({"a": [[1]]}, {"a": [[2, 3]]})
    assert not rg_codeio._same_kinds({"a": [1.5]}, {"a": [1]})  # a float for an int, inside a list too
    assert not rg_codeio._same_kinds({"a": [["x"]]}, {"a": [[1]]})
    assert not rg_codeio._same_kinds({"a": [{"zz": 1}]}, {"a": [{"k": 1}]})
    # without the sandbox (its extension not built) an answer keeps the package's partial credit
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "rci_fast.sandbox", None)  # import fails
        mp.setattr(rg_codeio, "_sandbox", None)
        mp.setattr(rg_codeio, "_unavailable", False)
        mp.setattr(rg_codeio, "_outputs", {})
        assert not rg_codeio.is_feasible_input('{"n": 9, "tag": "xy"}', entry) and rg_codeio._unavailable
    # the stored output came from another random state: the program takes no other input
    drawn = "import random\ndef main_solution(n):\n    return round(random.random() + n, 9)\n"
    entry = _codeio_entry(drawn, {"n": 1}, 1.123456789)
    assert not rg_codeio.is_feasible_input('{"n": 1}', entry) and not rg_codeio.is_feasible_input('{"n": 2}', entry)


def _other_forms(name: str, gold: str) -> list[str]:
    """Ways to write this gold that are the same answer (rg_forms)."""
    forms = [f"{gold}.", f"{gold}...", f" {gold} ", f"Answer: {gold}", f"final answer: {gold}."]
    if name != "rg/codeio":  # quotes make a JSON string there (below)
        forms += [f'"{gold}"', f"`{gold}`", f"'{gold}'.", f'"{gold}."', f'"`{gold}`"', f'" {gold} "',
                  f'Answer: "{gold}"']
        if re.fullmatch(r"-?\d+", gold):
            forms += [f"{gold}.0", f"{int(gold):,}"]
        if re.fullmatch(r"-?\d+\.\d+", gold):
            forms += [f"{gold}0"]
        if re.fullmatch(r"-?\d+/\d+", gold):
            forms += [gold.replace("/", " / ")]
        if gold[:1] in "[(" and "'" not in gold and '"' in gold:
            forms += [gold.replace('"', "'")]
    if gold[:1] in "[(" and ", " in gold and '"' not in gold and "'" not in gold:
        forms += [gold.replace(", ", ",")]  # items without quotes inside: no comma in them
    if "\n" in gold:
        forms += ["\n".join(line + "  " for line in gold.splitlines())]
    if gold.endswith("."):
        forms += [gold[:-1]]
    return forms


@pytest.mark.slow  # generates samples of every dataset (~25 s)
def test_an_answer_written_another_way_scores_as_the_gold():
    """The gold behind an "Answer:" label, quotes, backticks or a full stop, 87.0 for 87, 3,544 for
    3544, a list with other spacing or quotes, a grid with trailing spaces scores 1 in every
    dataset (the package's scorers gave 0 or partial credit); so does True/False, Yes/No and the
    like in any case where the prompt's case is not part of the answer, while the other word in
    any case does not. Near misses score full marks only where the package's own scorer does."""
    opposite = {"true": "false", "false": "true", "yes": "no", "no": "yes"}
    boolean = []
    for name in RG:
        task = load_task(name, train_size=6, validation_size=1)
        samples = task.samples("train")
        for s in samples:
            gold = task.gold_answer(s).strip()
            for form in _other_forms(name, gold):
                assert task.score(s, f"<<<{form}>>>") == 1.0, (name, gold, form)
            cut = [] if gold.endswith(".") else [f'"{gold[:-1]}"']  # a sentence's own full stop may go
            for near in [f'"{gold}x"', f'"{gold}', f"{gold}'", f'"{gold}\'', "<<<.>>>", f"Answer: {gold}x"] + cut:
                if task.score(s, f"<<<{near}>>>") == 1.0:  # only where the package says so too
                    cleaned = rg_forms.clean(extract_answer(f"<<<{near}>>>"), gold, name.removeprefix("rg/"))
                    assert task._scorer.score_answer(cleaned, s.data) == 1.0, (name, near)
            assert task.score(s, '<<<"zzz not an answer">>>') < 1.0, name
        if not all(task.gold_answer(s).strip().lower() in opposite for s in samples):
            continue
        boolean.append(name.removeprefix("rg/"))
        for s in samples:
            gold = task.gold_answer(s).strip()
            for form in (str.lower, str.upper, str.capitalize):
                assert task.score(s, f"<<<{form(gold)}>>>") == 1.0, (name, gold, form(gold))
                assert task.score(s, f"<<< {form(opposite[gold.lower()])}. >>>") < 1.0, (name, gold)
    assert {"course_schedule", "isomorphic_strings", "ransom_note", "syllogism"} <= set(boolean), boolean


def test_answer_forms_the_prompts_invite_and_those_they_rule_out():
    def samples(name, n=8):
        task = load_task(f"rg/{name}", train_size=n, validation_size=1)
        return task, task.samples("train")
    # intermediate_integration: "use exp(x) or E**(x)"; the guard refused E**(x)
    task, ss = samples("intermediate_integration")
    golds = [(s, task.gold_answer(s)) for s in ss if "exp(" in task.gold_answer(s)]
    assert golds
    for s, gold in golds:
        assert task.score(s, "<<<" + gold.replace("exp(", "E**(") + ">>>") == 1.0, gold
    # a word answer in any case where the prompt's case is not part of it
    for name in ("acre", "mahjong_puzzle", "calendar_arithmetic", "shortest_path"):
        task, ss = samples(name, 40)
        words = [s for s in ss if task.gold_answer(s).isalpha()]
        assert words, name
        for s in words:
            assert task.score(s, f"<<<{task.gold_answer(s).swapcase()}>>>") == 1.0, (name, task.gold_answer(s))
    # codeio predicts JSON: other whitespace is the same value, quotes or .0 make another type
    task, ss = samples("codeio", 40)
    numeric = [s for s in ss if re.fullmatch(r"-?\d+", task.gold_answer(s).strip())]
    lists = [s for s in ss if task.gold_answer(s).strip().startswith("[") and ", " in task.gold_answer(s)]
    assert numeric and lists
    for s in numeric:
        gold = task.gold_answer(s).strip()
        assert task.score(s, f'<<<"{gold}">>>') < 1.0 and task.score(s, f"<<<{gold}.0>>>") < 1.0
        assert task.score(s, f"<<<{gold}.>>>") == 1.0 and task.score(s, f"<<<Answer: {gold}>>>") == 1.0
    for s in lists:
        gold = task.gold_answer(s).strip()
        assert task.score(s, "<<<" + json.dumps(json.loads(gold), separators=(",", ":")) + ">>>") == 1.0
    # letter_jumble keeps the words' capitals: its scorer gave a lower-case answer full marks
    task, ss = samples("letter_jumble")
    capitalised = [s for s in ss if task.gold_answer(s) != task.gold_answer(s).lower()]
    assert capitalised
    for s in capitalised:
        assert task.score(s, f"<<<{task.gold_answer(s).lower()}>>>") < 1.0
    # a case change inside quotes gains nothing where case is part of the answer
    task, ss = samples("caesar_cipher", 4)
    for s in ss:
        assert task.score(s, f'<<<"{task.gold_answer(s).lower()}">>>') < 1.0
    # a second guess after a comment, strings run together, a number with leading zeros: not the gold
    task, ss = samples("list_functions")
    s = next(s for s in ss if ", " in task.gold_answer(s))
    gold = task.gold_answer(s)
    assert task.score(s, f"<<<{gold}  # or maybe [1, 2, 3]>>>") < 1.0
    assert task.score(s, f"<<<{gold}\n# alternatively [1, 2, 3]>>>") < 1.0
    task, ss = samples("palindrome_partitioning", 20)
    s = next(s for s in ss if '"' in task.gold_answer(s) and '", "' in task.gold_answer(s))
    joined = task.gold_answer(s).replace('", "', '" "', 1)  # two items read as one string by Python
    assert task.score(s, f"<<<{joined}>>>") < 1.0
    task, ss = samples("manipulate_matrix", 60)
    s = next(s for s in ss if task.gold_answer(s).strip() == "0")
    assert task.score(s, "<<<00>>>") < 1.0 and task.score(s, "<<<0,000>>>") < 1.0
    # another number stays another number
    task, ss = samples("gcd", 4)
    for s in ss:
        gold = int(task.gold_answer(s))
        assert task.score(s, f"<<<{gold + 1}.0>>>") < 1.0 and task.score(s, f"<<<{gold}.5>>>") < 1.0


def test_a_long_wrapped_answer_is_read_in_linear_time():
    task = load_task("rg/chain_sum", train_size=2, validation_size=1)
    s = task.samples("train")[0]
    gold = task.gold_answer(s)
    start = time.perf_counter()
    assert task.score(s, f"<<<{gold}{'.' * 200_000}>>>") == 1.0
    assert task.score(s, f"<<<{'`' * 50_000}{gold}{'`' * 50_000}>>>") == 1.0
    assert task.score(s, f"<<<{'.' * 200_000}>>>") == 0.0
    assert time.perf_counter() - start < 2.0
