"""
Problems: the embedded toy math world (the stand-in for MATH) and answer checking.

Every toy problem asks for the unknown x of an equation: `x+23=58;x=` -> `35`. Its *construction* is the same
equation solved forward, with x's value written in: `35+23=58`. Solving needs the inverse operation (58 - 23);
constructing needs only the forward one (35 + 23), which the base model may do more reliably (room.py measures it,
per domain). This is the asymmetry that self-synthesis exploits: the generator writes constructions (it picks an x
near what T's x looks like and computes forward), each one a solved practice problem whose answer is right whenever
its forward arithmetic is, and a construction whose equation is T itself is a candidate answer to T.

Five domains, a*x=c, a*x+b=c, x-b=c, x+b=c and a triangle's third angle, each with a seeded sampler,
`nearby_constructions()` (what a perfect generator writes) and a checker that solves ANY well-formed problem, so
synthetic examples can be checked for diagnostics. The checker never feeds training.

    python tasks.py        # prints a few problems and constructions of each domain
"""
import json
import math
import os
import random
import re
import zlib

BOS = "\n"           # every sequence starts on a fresh line
TARGET_MARK = "@"    # '@T' opens a block of practice constructions written for target T

# ----------------------------------------------------------------------------- the domains
# Each domain: the left-hand side with named slots ({x} is the unknown), its value f(x, params) (increasing or
# decreasing in x, so x is unique), and a sampler of x and the parameters in the "pretraining range".

DOMAINS = {  # name: (left-hand side, value, sampler)
    "multiplication": ("{a}*{x}", lambda a, x: a * x,                 # solving needs a division
                       lambda r: dict(a=r.randint(2, 9), x=r.randint(10, 99))),
    "linear": ("{a}*{x}+{b}", lambda a, x, b: a * x + b,              # a subtraction, then a division
               lambda r: dict(a=r.randint(2, 9), x=r.randint(10, 99), b=r.randint(10, 99))),
    "subtraction": ("{x}-{b}", lambda x, b: x - b,                    # solving needs an addition
                    lambda r: (lambda b: dict(x=r.randint(b + 10, 99), b=b))(r.randint(10, 59))),
    "addition": ("{x}+{b}", lambda x, b: x + b,                       # solving needs a subtraction
                 lambda r: dict(x=r.randint(10, 59), b=r.randint(10, 39))),
    "angles": ("tri({a},{x})", lambda a, x: 180 - a - x,              # the third angle of a triangle
               lambda r: (lambda a: dict(a=a, x=r.randint(20, 150 - a)))(r.randint(20, 99))),
}
DOMAIN_NAMES = list(DOMAINS)
X_RANGE = range(1, 1000)   # where the checker looks for x


def _pattern(lhs, unknown):
    """A regex for `lhs=value` with every slot a number, except {x} written as `unknown` (None: a number too)."""
    regex = re.escape(lhs).replace(r"\{", "{").replace(r"\}", "}")
    for name in re.findall(r"{(\w+)}", lhs):
        slot = re.escape(unknown) if name == "x" and unknown else rf"(?P<{name}>\d+)"
        regex = regex.replace(f"{{{name}}}", slot)
    return re.compile(regex + r"=(?P<value>\d+)")


_PROBLEMS = {d: _pattern(lhs, "x") for d, (lhs, _, _) in DOMAINS.items()}          # x+23=58
_CONSTRUCTIONS = {d: _pattern(lhs, None) for d, (lhs, _, _) in DOMAINS.items()}    # 35+23=58


def problem_text(domain, params, value):
    """`x+23=58;x=`: the equation with x unknown, then the question."""
    return DOMAINS[domain][0].format(**{**params, "x": "x"}) + f"={value};x="


def construction(domain, x, params):
    """`35+23=58`: the equation solved forward, x written in, its value computed."""
    lhs, f, _ = DOMAINS[domain]
    return lhs.format(**{**params, "x": x}) + f"={f(x=x, **params)}"


def domain_of(problem):
    """The domain whose syntax `problem` follows, or None (a malformed problem)."""
    for d, pattern in _PROBLEMS.items():
        if problem.endswith(";x=") and pattern.fullmatch(problem[:-3]):
            return d
    return None


def _fields(problem):
    """(domain, params, value) of a well-formed problem; raises on a malformed one."""
    d = domain_of(problem)
    fields = {k: int(v) for k, v in _PROBLEMS[d].fullmatch(problem[:-3]).groupdict().items()}
    return d, {k: v for k, v in fields.items() if k != "value"}, fields["value"]


def solve(problem):
    """The true answer (x) of any well-formed problem text, as a string; None if malformed or unsolvable."""
    if domain_of(problem) is None:
        return None
    d, params, value = _fields(problem)
    f = DOMAINS[d][1]
    return next((str(x) for x in X_RANGE if f(x=x, **params) == value), None)


def from_construction(line):
    """The practice example (problem, answer) that a construction line `35+23=58` states: (`x+23=58;x=`, `35`);
    None when the line is no construction. The answer is right exactly when the line's arithmetic is."""
    for d, pattern in _CONSTRUCTIONS.items():
        match = pattern.fullmatch(line)
        if match:
            fields = {k: int(v) for k, v in match.groupdict().items()}
            x, value = fields.pop("x"), fields.pop("value")
            return problem_text(d, fields, value), str(x)
    return None


def is_heldout(problem):
    """A fixed, seed-free split: about 1 problem in 5 is held out, decided by a hash of its text."""
    return zlib.crc32(problem.encode()) % 5 == 0


def sample_problem(rng, domain, split="train"):
    """A (problem, answer) pair of `domain` from `split` ('train' or 'heldout'); the two are disjoint."""
    lhs, f, sampler = DOMAINS[domain]
    while True:
        params = sampler(rng)
        x = params.pop("x")
        problem = problem_text(domain, params, f(x=x, **params))
        if is_heldout(problem) == (split == "heldout"):
            return problem, str(x)


def nearby_constructions(problem, rng, n, spread=3):
    """n constructions of T's equation with x moved by at most `spread` from T's true x (0 included: T itself),
    the values computed exactly: what a perfect generator writes for T, and the pretraining blocks' lines."""
    d, params, _ = _fields(problem)
    x, f = int(solve(problem)), DOMAINS[d][1]
    lines = []
    while len(lines) < n:
        x_new = x + rng.randint(-spread, spread)
        if x_new >= 1 and f(x=x_new, **params) >= 1:
            lines.append(construction(d, x_new, params))
    return lines


def nearby(problem, rng, spread=3):
    """A solvable problem of the same equation whose x differs from T's by at most `spread` (possibly T itself)."""
    return from_construction(nearby_constructions(problem, rng, 1, spread)[0])[0]


def heldout_targets(n, seed):
    """n held-out (domain, problem, answer) targets, balanced over domains, deterministic in `seed`."""
    rng = random.Random(seed)
    targets, seen = [], set()
    for _ in range(100 * n):
        d = DOMAIN_NAMES[len(targets) % len(DOMAIN_NAMES)]
        problem, answer = sample_problem(rng, d, "heldout")
        if problem not in seen:
            seen.add(problem)
            targets.append((d, problem, answer))
        if len(targets) == n:
            return targets
    raise ValueError(f"the held-out split of domain {d} has too few problems for {n} targets")


def train_targets(rng):
    """An endless stream of (domain, problem, answer) meta-training targets from the train split."""
    while True:
        d = rng.choice(DOMAIN_NAMES)
        yield (d, *sample_problem(rng, d, "train"))


# ---- real data: MATH / GSM8K JSONL, answer extraction and grading
# The same checks for real data: the final answer of a worked solution, MATH's answer normalisation (after
# Hendrycks et al.'s `is_equiv` and the math-evaluation-harness), and a loader for MATH- and GSM8K-style JSONL.

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
        return {"domain": "gsm8k", "problem": row["question"], "solution": row["answer"], "answer": answer}
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


if __name__ == "__main__":
    rng = random.Random(0)
    for d in DOMAIN_NAMES:
        p, a = sample_problem(rng, d)
        print(f"{d:15s} {p}{a:5s} constructions: {'  '.join(nearby_constructions(p, rng, 3))}")
