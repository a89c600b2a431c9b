"""
Real math data: MATH- and GSM8K-style JSONL, reading and grading final answers, the natural-language prompts,
and `MathWorld`, the world interface of world.py for them.

A row becomes {domain, problem, solution, answer}: MATH rows have `problem`, `solution`, `subject` or `type` (and
optionally `answer`); GSM8K rows `question` and an `answer` ending in `#### N`. A reference solution's final answer
is its last \\boxed{} or GSM8K's `#### N` (`extract_answer`).

A model's solution is graded as the field grades it, with Hugging Face's math-verify: its final answer is read in the
forms models write (\\boxed{}, `#### N`, "The answer is N", "A: N", "**N**", "$1,200.00", "18 apples") and compared
with the reference by value (fractions, radicals, sets, intervals, tuples, units, \\text{}). Where math-verify reads
nothing, the hand-written MATH normalisation (`is_equiv`, after Hendrycks et al. and the math-evaluation-harness)
decides.

The generator is asked for a similar problem as `Problem: ... Solution: ...` ending in \\boxed{...}, in the
tokenizer's chat template when it has one; an example is usable when it has a problem (after a label such as
"Problem:", "**Problem 1:**", "### Problem" or "Question:"), a solution ("Solution:", "Answer:", ...) and a final
answer that the grader can read.

    python math_data.py FILE.jsonl     # loads a file and prints its first rows' domains and answers
"""
import json
import math
import os
import re
import sys
import threading

from math_verify import parse, verify
from sympy import Basic, MatrixBase, nan, zoo

# ----------------------------------------------------------------------------- final answers, hand-written


def _last_boxed(text):
    """The content of the last \\boxed{...} or \\fbox{...} (nested braces balanced; `\\boxed 5` gives 5), or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    if text[i:i + 1] == " ":                          # \boxed 5: up to the next space or '$'
        return re.split(r"[\s$]", text[i + 1:], maxsplit=1)[0] or None
    if text[i:i + 1] != "{":
        return None
    depth, j = 0, i
    while j < len(text):
        if text[j] == "\\":                           # skip \{ and \}: literal braces, not grouping
            j += 2
            continue
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
        j += 1
    return None                                       # the box is never closed


def _gsm8k_number(text):
    """The number after GSM8K's final '#### ', thousands commas removed, or None."""
    if "####" not in text:
        return None
    return text.rsplit("####", 1)[1].strip().replace(",", "") or None


def extract_answer(text):
    """The final answer of a worked solution: the last \\boxed{} (or \\fbox{}), else GSM8K's '#### N', else None."""
    if not isinstance(text, str):
        return None
    boxed = _last_boxed(text)
    return boxed if boxed is not None else _gsm8k_number(text)


def _normalise(s):
    """An answer string in a canonical form: MATH's formatting, units and equivalent spellings taken out."""
    s = s.replace("\n", "").replace("{,}", "").replace(",\\!", "")   # 10{,}000 and 10,\!000: thousands marks
    for mark in ["\\left", "\\right", "\\!", "\\,", "\\;", "\\:", "^{\\circ}", "^\\circ", "\\$", "$", "\\%", "%"]:
        s = s.replace(mark, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\mbox{", "\\text{").replace("\\textbf{", "\\text{")
    units = re.fullmatch(r"(.+?)\\text\{[^{}]*\}(\^\{?\d\}?)?", s.strip())   # 5\text{ cm}^2 -> 5
    if units:
        s = units.group(1)
    s = re.sub(r"\\text\{([^{}]*)\}", r"\1", s)      # \text{east} -> east
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2:
        s = sides[1]                                  # x = 5 -> 5
    s = s.strip()
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")                        # 1,000 -> 1000, but (1,2) and 1, 2 keep theirs
    s = s.replace(" ", "").rstrip(".")
    s = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)       # \sqrt3 -> \sqrt{3}
    s = re.sub(r"\\frac(\w)", r"\\frac{\1}", s)         # \frac12 -> \frac{1}2
    s = re.sub(r"\\frac(\{[^{}]*\})(\w)", r"\\frac\1{\2}", s)   # \frac{1}2 -> \frac{1}{2}
    if re.fullmatch(r"\([A-Z]\)", s):
        s = s[1]                                      # (C) -> C
    return s


def _to_number(s):
    """The value of a normalised answer that is a plain number, a/b or \\frac{a}{b}; None otherwise."""
    s = re.sub(r"^(-?)\\frac\{([^{}]*)\}\{([^{}]*)\}$", r"\1\2/\3", s)   # -\frac{a}{b} -> -a/b
    parts = s.split("/")
    if len(parts) > 2 or not all(re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)", p) for p in parts):   # 5, -2.5, .5
        return None
    numbers = [float(p) for p in parts]
    if not all(math.isfinite(n) for n in numbers):
        return None                                   # too large for a float: compare as text only
    if len(numbers) == 1:
        return numbers[0]
    return numbers[0] / numbers[1] if numbers[1] != 0 else None   # a/b; a/0 is no number


def is_equiv(pred, gold, rel_tol=1e-6):
    """Whether two answers match after `_normalise`, or as numbers within `rel_tol`; False (no error) for garbage."""
    if not isinstance(pred, str) or not isinstance(gold, str):
        return False
    a, b = _normalise(pred), _normalise(gold)
    if a == b:
        return a != ""
    x, y = _to_number(a), _to_number(b)
    return x is not None and y is not None and math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-12)


# ----------------------------------------------------------------------------- grading with math-verify

TIMEOUT_S = 5   # math-verify's limit on one parse or one comparison (sympy can hang on 10^{10^{10}})


def _time_limit():
    """math-verify times out with SIGALRM, which only the main thread may set: elsewhere it runs without a limit."""
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _values(text):
    """What math-verify reads as the final answer of `text`: sympy values ([] when none; 1/0 and NaN dropped)."""
    found = parse(text, parsing_timeout=_time_limit())
    return [v for v in found if isinstance(v, (Basic, MatrixBase)) and not v.has(zoo, nan)]


def read_answer(text):
    """The final answer of a model's solution, as math-verify's sympy values: the last line '#### N' (GSM8K) or
    'A: N' when there is one, else math-verify's reading (\\boxed{}, "final answer is", "answer", else the last
    number or LaTeX); [] when none."""
    if not isinstance(text, str):
        return []
    marked = re.findall(r"^(?:####|A:) *(\$?-?[\d,]*\.?\d+)\.? *$", text, re.M)   # not '#### Step 2', 'A: 3 + 4 = 7'
    return _values(marked[-1] if marked else text)


def same_values(gold, pred):
    """Do math-verify's readings of a reference and a prediction agree (numbers, fractions, sets, intervals, ...);
    not symmetric: `gold` is the reference (an equation x = 5 in pred matches 5, not the other way)."""
    return verify(gold, pred, timeout_seconds=_time_limit())


def is_correct(solution_text, reference_answer):
    """Is a model's worked solution right: its final answer (read_answer) equals the reference answer, read as the
    content of a \\boxed{}. Where math-verify reads nothing in either, the hand-written extraction and `is_equiv`."""
    gold = _values(f"\\boxed{{{reference_answer}}}") if isinstance(reference_answer, str) else []
    pred = read_answer(solution_text)
    return same_values(gold, pred) if gold and pred else is_equiv(extract_answer(solution_text), reference_answer)


# ----------------------------------------------------------------------------- MATH / GSM8K JSONL

def _parse_row(row, where):
    """One JSONL row as {domain, problem, solution, answer}; `where` is 'file:line' for the error messages."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "problem" in row:                              # MATH: problem, solution, subject or type, answer optional
        fields = ["problem", "solution", "subject" if "subject" in row else "type"]
    elif "question" in row:                           # GSM8K: question, answer ending in '#### N'
        fields = ["question", "answer"]
    else:
        raise ValueError(f"{where}: neither MATH ('problem') nor GSM8K ('question') fields; has {sorted(row)}")
    missing = [f for f in fields if not isinstance(row.get(f), str)]
    if missing:
        raise ValueError(f"{where}: missing or non-string field(s) {', '.join(missing)}")
    if "question" in row:
        answer = _gsm8k_number(row["answer"])
        if answer is None:
            raise ValueError(f"{where}: the GSM8K answer has no final '#### N'")
        solution = re.sub(r"<<[^<>]*>>", "", row["answer"])   # calculator notes, 48/2 = <<48/2=24>>24: not text
        return {"domain": "gsm8k", "problem": row["question"], "solution": solution, "answer": answer}
    answer = str(row["answer"]) if row.get("answer") is not None else extract_answer(row["solution"])
    if answer is None:
        raise ValueError(f"{where}: no 'answer' field and no \\boxed{{}} in the solution")
    return {"domain": row[fields[2]], "problem": row["problem"], "solution": row["solution"], "answer": answer}


def load_jsonl(path):
    """A MATH- or GSM8K-style JSONL file as [{domain, problem, solution, answer}]; errors name the file and line."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")                # a leading byte-order mark is allowed
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte {e.start})") from None
    rows = []
    for number, line in enumerate(text.split("\n"), 1):   # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not JSON ({e.msg}, column {e.colno})") from None
        rows.append(_parse_row(row, f"{path}:{number}"))
    if not rows:
        raise ValueError(f"{path}: empty file, no rows")
    return rows


def reference(row, outer_target):
    """R* of a row, the text the outer loss is measured on: its worked solution, or its answer alone as \\boxed{}."""
    if outer_target not in ("solution", "answer"):
        raise ValueError(f"outer_target must be 'solution' or 'answer', not {outer_target!r}")
    return row["solution"] if outer_target == "solution" else f"\\boxed{{{row['answer']}}}"


def row_targets(rows, rng, outer_target):
    """An endless stream of (domain, problem, R*) meta-training targets drawn from load_jsonl rows."""
    while True:
        row = rng.choice(rows)
        yield row["domain"], row["problem"], reference(row, outer_target)


# ----------------------------------------------------------------------------- the natural-language prompts

SOLVE = "Solve the following math problem. Put the final answer in \\boxed{{}}.\n\n{problem}"
PRACTICE = ("Write one new math problem like this one (same kind of reasoning, different numbers), then solve it "
            "step by step.\n\n{target}")
# The generator's prompt shows the format once, as an earlier exchange (a GSM8K train row asked about, the next row
# answered), and starts the reply with "Problem:". Measured on SmolLM2-135M-Instruct (docs/smollm2.md): asked for the
# format in words alone it wrote a parseable example 1 time in 16; this way, most of the time.
SHOWN = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many "
         "clips did Natalia sell altogether in April and May?")
SHOWN_REPLY = ("Problem: Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
               "How much did she earn?\nSolution: Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned "
               "0.2 x 50 = $10.\nThe answer is 10.")
REPLY_START = "Problem:"


def chat(tok, text, before=()):
    """text as a user turn in the tokenizer's chat template, ready for the assistant's reply; plain text without one.
    before: earlier (user, assistant) exchanges."""
    turns = [x for user, reply in before for x in ({"role": "user", "content": user},
                                                    {"role": "assistant", "content": reply})]
    turns.append({"role": "user", "content": text})
    if not tok.chat_template:
        return "".join(t["content"] + "\n\n" for t in turns)
    prompt = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    if tok.bos_token and prompt.startswith(tok.bos_token) and tok.bos_token_id in tok("")["input_ids"]:
        prompt = prompt[len(tok.bos_token):]   # the tokenizer adds BOS itself (Llama 3): not twice
    return prompt


def practice_prompt(tok, target):
    """What the generator continues: the format shown once, then T; the reply already begun with "Problem:"."""
    return chat(tok, PRACTICE.format(target=target), before=[(PRACTICE.format(target=SHOWN), SHOWN_REPLY)]) + REPLY_START


def _label(words, letter):
    """A label that opens a part, as models write it: 'Problem:', '**Problem 1:**', '### Problem' on its own line,
    'Q:' at a line's start, or inline after a space ('Here is a new practice problem: ...'); any case."""
    return re.compile(rf"^[ \t#*]*(?:{words}|{letter})(?: *#?\d+)?[ \t*]*(?::[ \t*]*|$)"   # at a line's start
                      rf"|(?<=\s)(?:{words})(?: *#?\d+)?\**:\**", re.I | re.M)              # inline, with a colon


PROBLEM_LABEL = _label(r"(?:practice |new |similar )?(?:problem|question)", "q")
SOLUTION_LABEL = _label(r"(?:worked |step-by-step )?(?:solution|answer)", "a")


def has_final_answer(text):
    """Does a solution state a final answer the grader can read (read_answer, or \\boxed{} / '#### N')."""
    return bool(read_answer(text)) or extract_answer(text) is not None


def parse_worked(text):
    """(problem, solution) from a practice example written as 'Problem: ... Solution: ...' (or one of the label
    forms of `_label`; 'Question: ... Answer: ...'), whose solution has a final answer; None otherwise. The problem
    follows the last problem label before the first solution label; the solution ends at the next problem label that
    opens a line (a second practice problem; 'To solve this problem: ...' inside the solution does not end it)."""
    first = PROBLEM_LABEL.search(text)
    found = first and SOLUTION_LABEL.search(text, first.end())
    if not found:
        return None
    problem = text[[m.end() for m in PROBLEM_LABEL.finditer(text, 0, found.start())][-1]:found.start()]
    ends = [m.start() for m in PROBLEM_LABEL.finditer(text, found.end()) if text[m.start() - 1] == "\n"]
    solution = text[found.end():ends[0] if ends else len(text)]
    problem, solution = problem.strip(" *#\n"), solution.strip()
    if not re.search(r"[^\W\d_]{2}", problem) or not has_final_answer(solution):
        return None                                   # no problem in words ('Problem: 3'), or no final answer
    return problem, solution


# ----------------------------------------------------------------------------- real data, as a world (world.py)

class MathWorld:
    """MATH / GSM8K rows behind the interface in world.py: worked solutions, EOS ends every text, final answers
    graded by equivalence. No checker: correctness of a generated example cannot be known.
    train_rows: meta-training targets (None: evaluation only); eval_rows: held-out targets (None: the first rows
    of train_rows, which are not held out); n_heldout: how many of them; outer_target: R* is the reference
    'solution' or the 'answer' alone, as \\boxed{answer}."""
    stop = None
    has_checker = False

    def __init__(self, train_rows, eval_rows, n_heldout, outer_target="solution"):
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.n_heldout, self.outer_target = n_heldout, outer_target

    def train_targets(self, rng):
        return row_targets(self.train_rows, rng, self.outer_target)

    def heldout(self):
        if self.eval_rows is None:
            print("no --eval-data: evaluating on rows of --data, the meta-training data (not held out)")
        rows = (self.eval_rows or self.train_rows)[:self.n_heldout]
        return [(r["domain"], r["problem"], reference(r, self.outer_target), r["answer"]) for r in rows]

    def practice_prompt(self, tok, target):
        return practice_prompt(tok, target)

    def parse(self, text):
        return parse_worked(REPLY_START + text)     # the prompt began the reply with "Problem:"

    def as_written(self, text, prompt, answer):
        return prompt, answer                        # a worked example is written as it is trained on

    def answer_prompt(self, tok, problem):
        return chat(tok, SOLVE.format(problem=problem))

    def answer_end(self, tok):
        return tok.eos_token or ""                   # the end of the assistant's turn

    def answer_text(self, answer):
        return reference({"answer": answer}, "answer")   # \boxed{answer}

    def is_correct(self, predicted, answer):
        return is_correct(predicted, answer)

    def same_answer(self, a, b):
        x, y = read_answer(a), read_answer(b)
        return same_values(y, x) if x and y else is_equiv(extract_answer(a), extract_answer(b))

    def random_examples(self, rng, target, m):
        """m random rows other than T, with their reference solutions: of --data, else of the evaluation file."""
        others = [r for r in (self.train_rows or self.eval_rows) if r["problem"] != target]
        if not others:
            raise ValueError("random_ttt needs rows other than the target: give --data or a longer --eval-data")
        return [(r["problem"], r["solution"]) for r in (rng.choice(others) for _ in range(m))]


if __name__ == "__main__":
    for row in load_jsonl(sys.argv[1])[:5]:
        print(f"{row['domain']:24s} answer {row['answer']!r:20s} {row['problem'][:60]!r}")
