"""
Tests of real math data (math_data.py): final-answer extraction, grading with math-verify against labelled model-style
solutions, equivalence, JSONL loading with its errors, parsing practice examples as small models write them; checks on
../shared/realdata (MATH-500, GSM8K, MATH train sample) when it is there, skipped otherwise.

    python -m pytest -q test_math_data.py
"""
import json
import os
import re
import threading
import time

import pytest

import math_data

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- real data: extraction, equivalence, loading

REALDATA = os.path.join(HERE, "..", "shared", "realdata")


@pytest.mark.parametrize("text, answer", [
    ("so $\\boxed{5}$.", "5"),
    ("first \\boxed{2}, then \\boxed{4}", "4"),                                   # the last box wins
    ("$\\boxed{\\frac{\\sqrt{3}}{2}}$", "\\frac{\\sqrt{3}}{2}"),                  # nested braces
    ("\\boxed{\\{1\\pm\\sqrt{5},-2\\}}", "\\{1\\pm\\sqrt{5},-2\\}"),              # escaped braces inside
    ("the answer is \\fbox{(1,2)}", "(1,2)"),
    ("so $\\boxed 7$ pencils", "7"),                                             # \boxed without braces
    ("half \\boxed{\\frac12", None),                                             # never closed
    ("Janet makes 9 * 2 = $<<9*2=18>>18\n#### 18", "18"),
    ("#### 1,000", "1000"),                                                      # GSM8K thousands comma
    ("so -3 dollars\n#### -3", "-3"),
    ("no final answer here", None),
    (None, None),
])
def test_extract_answer(text, answer):
    assert math_data.extract_answer(text) == answer


EQUIVALENCE = [
    ("\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("\\frac12", "\\frac{1}{2}", True),
    ("\\frac1b", "\\frac{1}{b}", True),
    ("\\tfrac{3}{4}", "0.75", True),
    ("0.5", "\\frac{1}{2}", True),
    ("1/2", "\\frac{1}{2}", True),
    ("-\\frac{1}{2}", "-0.5", True),
    ("\\sqrt3", "\\sqrt{3}", True),
    ("2\\sqrt2", "2 \\sqrt{2}", True),
    ("5\\text{ cm}", "5", True),
    ("864 \\mbox{ inches}^2", "864", True),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}", True),
    ("\\text{(C)}", "C", True),
    ("\\text{Evelyn}", "Evelyn", True),
    ("90^\\circ", "90", True),
    ("90^{\\circ}", "90", True),
    ("\\$18.90", "18.9", True),
    ("50\\%", "50", True),
    ("50%", "50", True),
    ("1,000", "1000", True),
    ("10,\\!080", "10080", True),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100", True),
    ("10{,}000", "10000", True),
    ("x = 5", "5", True),
    ("k=-3", "-3", True),
    ("5.", "5", True),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})", True),
    ("[2, 5)", "[2,5)", True),
    ("(-\\infty, 0]", "(-\\infty,0]", True),
    ("-7", "-7.0", True),
    ("3\\!\\cdot\\!4", "3\\cdot4", True),
    ("(1,2)", "(2,1)", False),                                                  # order matters in a tuple
    ("(1,2)", "12", False),                                                     # a tuple is not a number
    ("[2,5)", "(2,5)", False),                                                  # open vs closed interval
    ("0.33", "\\frac{1}{3}", False),                                            # close is not equal
    ("-5", "5", False),
    ("\\sqrt{2}", "\\sqrt{3}", False),
    ("\\frac{1}{2}", "\\frac{2}{1}", False),
    ("x+1", "x-1", False),
    ("1/0", "\\frac{1}{0}", False),                                             # not numbers: no division by 0
    ("1/0", "2/0", False),
    ("1" + "0" * 400, "2" + "0" * 400, False),                                  # beyond float range: not both inf
    (None, "5", False),
    ("5", None, False),
    ("", "", False),
    ("\\boxed{", "}}{{", False),                                                # garbage: False, no error
]


def boxed_is_correct(pred, gold):
    """The grader (math-verify, is_equiv where it reads nothing) on a solution that is just pred in a \\boxed{}."""
    return math_data.is_correct(None if pred is None else f"\\boxed{{{pred}}}", gold)


@pytest.mark.parametrize("equal", [math_data.is_equiv, boxed_is_correct])   # hand-written, and the grader
@pytest.mark.parametrize("pred, gold, same", EQUIVALENCE)
def test_is_equiv(pred, gold, same, equal):
    assert equal(pred, gold) is same
    assert equal(gold, pred) is same


# Model-style solutions labelled by hand: (solution as a model writes it, reference answer, is it right).
JANET = "Janet sells 16 - 3 - 4 = 9 eggs a day at $2 each, so she makes 9 * 2 = 18 dollars.\n"
LABELLED = [
    (JANET + "#### 18", "18", True),
    (JANET + "#### 19", "18", False),                                # the right number earlier, a wrong final one
    (JANET + "The answer is 18.", "18", True),
    (JANET + "She gives 1 to her mother, so the answer is 17.", "18", False),
    (JANET + "A: 18", "18", True),
    (JANET + "A: 17", "18", False),
    ("To find the answer, 9 * 2 = 18 dollars.\nA: 19", "18", False),   # 'A: N' last: not math-verify's "answer ... ="
    ("A: 16 - 3 - 4 = 9 eggs, and 9 * 2 = 18. The answer is 18.", "18", True),   # 'A:' opening a worked answer
    (JANET + "**18**", "18", True),
    ("**Answer:** 18 dollars", "18", True),
    ("She has 18 apples.", "18", True),                              # units after the number
    ("She had 18 apples and ate 2, so 16 apples.", "18", False),
    ("She has $18.00 left.", "18", True),
    ("She has $18.50 left.", "18", False),
    (JANET + "The final answer is $\\boxed{18}$.", "18", True),
    ("First 18, then 9 * 2 + 1 = 19.\nThe answer is 19. I hope it helps!", "18", False),
    ("The answer is 18. Let me know if you have other questions!", "18", True),
    ("The total is 1,200 dollars.", "1200", True),                   # thousands commas
    ("It costs 1000 + 200 = 1,200.\n#### 1,200", "1200", True),
    ("So she pays $1,200.00.", "1200", True),
    ("The answer is 1,210.", "1200", False),
    ("The answer is 12,000.", "1200", False),
    ("So 25% of the students walk.", "25", True),                   # a percent
    ("The answer is 25 percent.", "25", True),
    ("So 75% of the students walk.", "25", False),
    ("The temperature is -3 degrees.", "-3", True),                 # negative numbers
    ("It drops by 3 degrees, so the answer is 3.", "-3", False),
    ("$x = \\boxed{-3}$", "-3", True),
    ("So $x = \\frac{1}{2}$, i.e. $\\boxed{0.5}$.", "\\frac{1}{2}", True),   # fractions
    ("The answer is 1/2.", "\\frac{1}{2}", True),
    ("so $\\boxed{\\dfrac12}$", "0.5", True),
    ("The final answer is $\\frac{1}{3}$. I hope it is correct.", "\\frac{1}{2}", False),
    ("\\boxed{2}", "\\frac{1}{2}", False),
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", "0.75", True),
    ("Hence $x \\in \\boxed{[2, 5)}$.", "[2,5)", True),                      # intervals
    ("Hence $x \\in \\boxed{(2, 5)}$.", "[2,5)", False),
    ("$\\boxed{(-\\infty, 0]}$", "(-\\infty,0]", True),
    ("The point is $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.", "(3,\\frac{\\pi}{2})", True),   # tuples
    ("The point is $\\boxed{(\\frac{\\pi}{2}, 3)}$.", "(3,\\frac{\\pi}{2})", False),
    ("$\\boxed{(2,1)}$", "(1,2)", False),
    ("The roots are $\\boxed{5, 3}$.", "3, 5", True),
    ("The answer is $\\boxed{C}$.", "\\text{(C)}", True),           # multiple choice
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", True),
    ("\\boxed{(D)}", "\\text{(C)}", False),
    ("\\boxed{\\text{Evelyn}}", "\\text{Evelyn}", True),
    ("\\boxed{\\text{Bob}}", "\\text{Evelyn}", False),
    ("so $\\boxed{\\sqrt{8}}$", "2\\sqrt{2}", True),               # radicals
    ("so $\\boxed{2\\sqrt{3}}$", "2\\sqrt{2}", False),
    ("The side is $\\boxed{5\\text{ cm}}$.", "5", True),            # units, degrees
    ("The angle is $\\boxed{90^\\circ}$.", "90", True),
    ("$\\boxed{(x+1)^2}$", "x^2+2x+1", True),                       # expressions
    ("$\\boxed{(x-1)^2}$", "x^2+2x+1", False),
    ("so the answer is \\boxed{5.}", "5", True),                   # math-verify reads nothing: the fallback reads it
    ("I do not know.", "18", False),
    ("", "18", False),
    (None, "18", False),
    ("\\boxed{", "18", False),
]


@pytest.mark.parametrize("text, answer, right", LABELLED)
def test_is_correct_reads_answers_as_models_write_them(text, answer, right):
    assert math_data.is_correct(text, answer) is right


def test_grading_off_the_main_thread_and_past_the_time_limit(monkeypatch):
    """math-verify's time limit is a SIGALRM, which only the main thread may set: a thread grades without one."""
    graded = []
    worker = threading.Thread(target=lambda: graded.append(math_data.is_correct("The answer is 1,200.", "1200")))
    worker.start()
    worker.join()
    assert graded == [True]
    monkeypatch.setattr(math_data, "TIMEOUT_S", 1)
    start = time.time()
    assert math_data.is_correct("\\boxed{10^{10^{10}}}", "5") is False       # sympy would hang: cut off, wrong
    assert time.time() - start < 4


def test_load_jsonl_reads_both_formats_and_skips_blank_lines(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"problem": "1+1?", "solution": "It is $\\boxed{2}$.", "type": "Algebra", "level": "Level 1"},
            {"problem": "2+2?", "solution": "4", "answer": "4", "subject": "Prealgebra", "level": 1},
            {"question": "How many?", "answer": "Some.\n#### 1,200"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n", encoding="utf-8")
    assert math_data.load_jsonl(str(path)) == [
        {"domain": "Algebra", "problem": "1+1?", "solution": "It is $\\boxed{2}$.", "answer": "2"},
        {"domain": "Prealgebra", "problem": "2+2?", "solution": "4", "answer": "4"},
        {"domain": "gsm8k", "problem": "How many?", "solution": "Some.\n#### 1,200", "answer": "1200"}]


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "empty file"),
    (b"\n  \n", "empty file"),
    (b'{"question": "q", "answer": "#### 1"}\n{"question": "caf\xe9"}\n', ":2: not UTF-8"),
    (b'{"question": "q", "answer": "#### 1"}\n\n{"question": \n', ":3: not JSON"),
    (b'[1, 2]\n', ":1: a row must be a JSON object"),
    (b'{"problem": "p", "type": "Algebra"}\n', ":1: missing or non-string field(s) solution"),
    (b'{"problem": "p", "solution": "s"}\n', ":1: missing or non-string field(s) type"),
    (b'{"problem": "p", "solution": "no box", "type": "Algebra"}\n', ":1: no 'answer' field"),
    (b'{"question": "q"}\n', ":1: missing or non-string field(s) answer"),
    (b'{"question": "q", "answer": "just 5"}\n', ":1: the GSM8K answer has no final '#### N'"),
    (b'{"text": "hello"}\n', ":1: neither MATH"),
])
def test_load_jsonl_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError) as error:
        math_data.load_jsonl(str(path))
    assert str(path) in str(error.value) and message in str(error.value) and "\n" not in str(error.value)


def realdata(name):
    """The path of a file of ../shared/realdata, or a clean skip where that folder is absent."""
    if not os.path.isdir(REALDATA):
        pytest.skip(f"no real data at {REALDATA}")
    return os.path.join(REALDATA, name)


def test_realdata_math500_extraction_agrees_with_answers():
    rows = math_data.load_jsonl(realdata("math500_test.jsonl"))
    wrong = [r["answer"] for r in rows if not math_data.is_equiv(math_data.extract_answer(r["solution"]), r["answer"])]
    assert len(rows) == 500 and len(wrong) <= 1, wrong


def test_realdata_gsm8k_extracts_every_final_number():
    rows = math_data.load_jsonl(realdata("gsm8k_test.jsonl"))
    finals = [r["solution"].split("####")[-1].strip().replace(",", "") for r in rows]
    assert len(rows) == 1319 and [math_data.extract_answer(r["solution"]) for r in rows] == finals
    assert all(r["answer"] == f and r["domain"] == "gsm8k" and re.fullmatch(r"-?\d+", f) for r, f in zip(rows, finals))
    assert not any("<<" in r["solution"] for r in rows)      # calculator notes are not text a model should learn


def model_style_endings(solution, n):
    """A GSM8K reference solution with its '#### N' line rewritten as models end theirs, final answer n."""
    body = solution.rsplit("####", 1)[0].strip()      # load_jsonl already dropped the <<48/2=24>> notes
    return [f"{body}\n{end}" for end in [f"#### {n}", f"The answer is {n}.", f"A: {n}", f"**{n}**", f"${n:,}",
            f"So the answer is ${n}.00.", f"{n:,} dollars", f"The final answer is $\\boxed{{{n}}}$.",
            f"\nAnswer: {n:,}", f"Therefore, she has {n} apples left."]]


def test_realdata_gsm8k_model_style_endings_are_graded():
    """Each row's solution ending in 10 forms with its answer N (right) and N + 1 (wrong): is_correct must agree with
    these labels on 99%. MASS_GRADE_ROWS=1319 grades all of GSM8K's test set (-s prints agreement and time)."""
    rows = math_data.load_jsonl(realdata("gsm8k_test.jsonl"))[:int(os.environ.get("MASS_GRADE_ROWS", "25"))]
    start, graded = time.time(), []
    for row in rows:
        for shown, right in [(int(row["answer"]), True), (int(row["answer"]) + 1, False)]:
            graded += [math_data.is_correct(text, row["answer"]) is right
                       for text in model_style_endings(row["solution"], shown)]
    print(f"\n{len(rows)} rows, {len(graded)} solutions: agreement {sum(graded) / len(graded):.2%}, "
          f"{time.time() - start:.1f} s")
    assert sum(graded) >= 0.99 * len(graded)


def test_realdata_math_train_sample_loads_with_answers():
    rows = math_data.load_jsonl(realdata("math_train_sample.jsonl"))
    assert len(rows) == 1000 and all(r["answer"] is not None and r["domain"] for r in rows)


@pytest.mark.parametrize("text, parsed", [
    ("Problem: What is 2+3?\nSolution: 2+3=5, so $\\boxed{5}$.", ("What is 2+3?", "2+3=5, so $\\boxed{5}$.")),
    ("Sure!\n**Problem:** Find x.\n**Solution:** x = 2, so \\boxed{2}", ("Find x.", "x = 2, so \\boxed{2}")),
    ("Problem: a train problem\nSolution: 3 hours\n#### 3", ("a train problem", "3 hours\n#### 3")),
    ("Problem: What is 2+3?\nSolution: it is 5.", ("What is 2+3?", "it is 5.")),   # its last number is an answer
    ("Problem: \nSolution: \\boxed{5}", None),                                  # no problem
    ("Problem: What is 2+3? \\boxed{5}", None),                                 # no solution part
    # as small instruct models write them
    ("**Problem 1:** What is 4+4?\n**Solution 1:** The answer is 8.", ("What is 4+4?", "The answer is 8.")),
    ("### Problem\nWhat is 4+4?\n\n### Solution\n4 + 4 = 8\n#### 8", ("What is 4+4?", "4 + 4 = 8\n#### 8")),
    ("**Practice Problem:** What is 4+4?\n\n**Solution:**\n4 + 4 = **8**", ("What is 4+4?", "4 + 4 = **8**")),
    ("Sure! Here is a new practice problem: What is 4+4?\nSolution: 8", ("What is 4+4?", "8")),
    ("Question: What is 4+4?\nAnswer: 4 + 4 = 8.\nA: 8", ("What is 4+4?", "4 + 4 = 8.\nA: 8")),
    ("Q: What is 4+4?\nA: 8", ("What is 4+4?", "8")),
    ("problem: what is 4+4?\nsolution: it is $\\frac{16}{2}$", ("what is 4+4?", "it is $\\frac{16}{2}$")),
    ("Problem: Problem solving: what is 4+4?\nSolution: 8", ("Problem solving: what is 4+4?", "8")),
    ("Problem: What is 4+4?\nSolution: 4+4=8.\n\nProblem 2: What is 5+5?\nSolution: 10", ("What is 4+4?", "4+4=8.")),
    ("Problem: What is 3+4?\nSolution: In this problem: 3 + 4 = 7.", ("What is 3+4?", "In this problem: 3 + 4 = 7.")),
    ("Problem: Find a: b if a = 2b.\nSolution: It is 2.", ("Find a: b if a = 2b.", "It is 2.")),   # 'A:' opens a line
    ("Problem: What is 4+4?\nSolution: It is eight.", None),                    # no final answer
    ("Problem: 3\nSolution: 2", None),                                           # no problem in words
    ("Problem: How far does James run?\n\nI'm ready to help.", None),          # no solution
    ("A farmer has 5 cows. How many legs?\nThey have 20 legs.", None),           # no labels
    ("Solution: \\boxed{5}\nProblem: What is 2+3?", None),                       # the solution before the problem
    # as SmolLM2-135M-Instruct wrote them to math_data.practice_prompt (docs/smollm2.md)
    ("Problem: John runs 60 meters each sprint. How many total meters does he run a week?\nSolution: 60 x 3 = 180 "
     "meters.\nThe answer is 180.", ("John runs 60 meters each sprint. How many total meters does he run a week?",
                                     "60 x 3 = 180 meters.\nThe answer is 180.")),
    ("Problem: 2 x 1. \nSolution: 2.\nThe answer is 2.", None),                    # no problem in words
    ("Problem: How much profit did Josh make?\nSolution:", None),                  # no solution
    ("Problem: 3 x 360 = 1000 meters\nThe answer is 1000.", None),                 # no solution label
    ("Problem: How many bags of cereal does it take to feed 20 chickens if each chicken eats 20 cans of cereal.",
     None),                                                                      # stopped before a solution
])
def test_worked_examples_parse(text, parsed):
    assert math_data.parse_worked(text) == parsed
