"""
The embedded toy math world (the stand-in for MATH): two-step problems, worked practice problems, a checker, the
base model's pretraining text, and `ToyWorld`, the world interface of world.py for it.

A toy problem is a two-step computation answered in one go: `23+42+18=` -> `83`. The model has no scratchpad
when it answers, so it must do both steps in its head. A *practice problem* is written worked, each step visible:
`42+23+18=65+18=83`. Writing it needs one step at a time with the numbers in view; the model trains on the problem
and its final answer (`42+23+18=` -> `83`) and then answers T. This is the asymmetry that self-synthesis
exploits, the step-by-step way of a pretrained LLM's worked examples: writing a worked related problem right is
easier than solving T in one go, and what the model learns from it carries over to T. How much carries over is
measured, not assumed (room.py).

Practice problems related to T come in four kinds, in the pretraining blocks `@T` that teach the base to write them:
  same     T reordered (`42+23+18=` for T = `23+42+18=`): another problem with T's answer
  twin     two numbers of T moved so that its answer stays (`24+41+18=`): T's answer, nearer (steps mix only)
  nearby   one number of T moved by 1 to 3 (`23+42+20=`): a neighbour, with another answer
  target   T itself, worked: a candidate answer to T (self-verification, not a practice problem; the evaluation
           reports it apart, as a comparison)

Five domains: a+b+c, a+b-c, a-b+c, a*b+c, a*b-c, each with a seeded sampler; a checker solves any problem, so
synthetic examples can be checked for diagnostics. The checker never feeds training.

    python tasks.py        # prints a problem of each domain and a pretraining block
"""
import random
import re
import zlib

BOS = "\n"           # every sequence starts on a fresh line
TARGET_MARK = "@"    # '@T' opens a block of worked practice problems written for target T

# ----------------------------------------------------------------------------- the domains
# A problem's terms (a, op1, b, op2, c), computed left to right: (a op1 b) op2 c. Each domain samples them in the
# "pretraining range"; every step's result is at least 0.

OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}
DOMAINS = {
    "add_add": lambda r: (r.randint(10, 49), "+", r.randint(10, 49), "+", r.randint(10, 49)),
    "add_sub": lambda r: (lambda a, b: (a, "+", b, "-", r.randint(10, min(99, a + b - 10))))(
        r.randint(10, 59), r.randint(10, 59)),
    "sub_add": lambda r: (lambda a: (a, "-", r.randint(10, a - 10), "+", r.randint(10, 59)))(r.randint(30, 99)),
    "mul_add": lambda r: (r.randint(10, 49), "*", r.randint(2, 9), "+", r.randint(10, 99)),
    "mul_sub": lambda r: (lambda a, b: (a, "*", b, "-", r.randint(10, min(99, a * b - 10))))(
        r.randint(10, 49), r.randint(2, 9)),
}
DOMAIN_NAMES = list(DOMAINS)
_DOMAIN_OF_OPS = {("+", "+"): "add_add", ("+", "-"): "add_sub", ("-", "+"): "sub_add", ("*", "+"): "mul_add",
                  ("*", "-"): "mul_sub"}
_PROBLEM = re.compile(r"(\d+)([-+*])(\d+)([-+*])(\d+)=")                  # 23+42+18=
_WORKED = re.compile(r"(\d+[-+*]\d+[-+*]\d+=)\d+[-+*]\d+=(\d+)")          # 42+23+18=65+18=83


def first_step(terms):
    a, op1, b, _, _ = terms
    return OPS[op1](a, b)


def value(terms):
    return OPS[terms[3]](first_step(terms), terms[4])


def problem_text(terms):
    """`23+42+18=`: the problem, answered in one go."""
    return "".join(map(str, terms)) + "="


def worked(terms):
    """`23+42+18=65+18=83`: the problem worked step by step, as a practice problem is written."""
    return f"{problem_text(terms)}{first_step(terms)}{terms[3]}{terms[4]}={value(terms)}"


def terms_of(problem):
    """The terms of a well-formed problem text, else None."""
    match = _PROBLEM.fullmatch(problem)
    return match and (int(match[1]), match[2], int(match[3]), match[4], int(match[5]))


def domain_of(problem):
    """The domain whose operations `problem` has, or None (a malformed problem)."""
    terms = terms_of(problem)
    return terms and _DOMAIN_OF_OPS.get((terms[1], terms[3]))


def solve(problem):
    """The true answer of any well-formed problem text, as a string; None if malformed or negative on the way."""
    terms = terms_of(problem)
    if terms is None or first_step(terms) < 0 or value(terms) < 0:
        return None
    return str(value(terms))


def from_worked(line):
    """The practice example (problem, answer) that a worked line `42+23+18=65+18=83` states: (`42+23+18=`, `83`);
    None when the line is not a worked problem. Its answer is the line's last number, right or wrong."""
    match = _WORKED.fullmatch(line)
    return match and (match[1], match[2])


def is_heldout(problem):
    """A fixed, seed-free split: about 1 problem in 5 is held out, decided by a hash of its text."""
    return zlib.crc32(problem.encode()) % 5 == 0


def sample_terms(rng, domain, split="train"):
    while True:
        terms = DOMAINS[domain](rng)
        if is_heldout(problem_text(terms)) == (split == "heldout"):
            return terms


def sample_problem(rng, domain, split="train"):
    """A (problem, answer) pair of `domain` from `split` ('train' or 'heldout'); the two are disjoint."""
    terms = sample_terms(rng, domain, split)
    return problem_text(terms), str(value(terms))


# ----------------------------------------------------------------------------- practice problems related to T


def reordered(terms):
    """T with the same answer, written otherwise: the first two numbers swapped (a-b+c becomes a+c-b, a+a+c 2*a+c)."""
    a, op1, b, op2, c = terms
    if op1 == "-":
        return a, "+", c, "-", b
    return (b, op1, a, op2, c) if a != b else (2, "*", a, op2, c)


def moved(terms, rng):
    """T with one of its numbers moved by 1 to 3 (a neighbour: another problem, another answer)."""
    while True:
        new = list(terms)
        i = rng.choice([0, 2, 4])
        new[i] += rng.choice([-3, -2, -1, 1, 2, 3])
        if min(new[0], new[2], new[4]) >= 1 and solve(problem_text(new)) is not None:
            return tuple(new)


def twin(terms, rng):
    """T with its answer kept and two of its numbers moved: a by d and b against it, so the first step stays
    (`24+41+18=` for T = `23+42+18=`), or a by d and c against the first step's change (`42*6+64=` for
    `41*6+70=`). Another problem with T's answer, nearer to T than its reordering. None when no move keeps every
    number at 1 or more."""
    a, op1, b, op2, c = terms
    for _ in range(100):
        d = rng.choice([-1, 1]) if op1 == "*" else rng.choice([-3, -2, -1, 1, 2, 3])
        if op1 != "*" and rng.random() < 0.5:
            new = (a + d, op1, b - d if op1 == "+" else b + d, op2, c)
        else:
            change = first_step((a + d, op1, b, op2, c)) - first_step(terms)
            new = (a + d, op1, b, op2, c - change if op2 == "+" else c + change)
        if min(new[0], new[2], new[4]) >= 1 and solve(problem_text(new)) is not None:
            return new
    return None


def related(terms, kind, rng):
    return {"same": lambda: reordered(terms), "nearby": lambda: moved(terms, rng), "target": lambda: terms,
            "twin": lambda: twin(terms, rng) or terms}[kind]()


def relation(problem, target):
    """How a practice problem relates to T: 'target' (T itself), 'same' (another problem with T's answer),
    'other' (anything else, a neighbour included), None if malformed."""
    answer = solve(problem)
    if answer is None:
        return None
    return "target" if problem == target else "same" if answer == solve(target) else "other"


# The pretraining mix (--pretrain-mix): what the base sees besides blocks. "steps" (the demo's): mostly single steps
# (either step of a problem), few one-go answers, and blocks with twins, so the base works a problem right far more
# often than it answers T in one go: the asymmetry that self-synthesis needs. "answers" (the demo before): mostly
# two-step problems answered in one go, so the base answers T more often than it works a problem right
# (docs/toy_world.md measures both). kinds and odds: what the blocks teach the base to write, so what the generator
# can choose among and learn to prefer.
MIXES = {"answers": dict(one_go=0.6, second_steps=False, kinds=["same", "nearby", "target"], odds=[0.4, 0.4, 0.2]),
         "steps": dict(one_go=0.15, second_steps=True, kinds=["twin", "same", "nearby", "target"],
                       odds=[0.2, 0.24, 0.36, 0.2])}


def pretraining_item(rng, block_share, mix="steps"):
    """A block (probability block_share): `@T` and four worked problems related to T, of kinds drawn with the mix's
    odds; else a problem with its one-go answer (the mix's one_go share) or a one-step problem with its answer (the
    first step, or with second_steps either step at even odds)."""
    mix = MIXES[mix]
    terms = sample_terms(rng, rng.choice(DOMAIN_NAMES))
    if rng.random() < block_share:
        kinds = rng.choices(mix["kinds"], weights=mix["odds"], k=4)
        return f"{TARGET_MARK}{problem_text(terms)}\n" + "".join(worked(related(terms, k, rng)) + "\n" for k in kinds)
    if rng.random() < mix["one_go"]:
        return f"{problem_text(terms)}{value(terms)}\n"
    a, op1, b, op2, c = terms
    if not mix["second_steps"] or rng.random() < 0.5:
        return f"{a}{op1}{b}={first_step(terms)}\n"
    return f"{first_step(terms)}{op2}{c}={value(terms)}\n"


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


# ----------------------------------------------------------------------------- the toy world, as a world (world.py)

class ToyWorld:
    """The toy world behind the interface in world.py: one-line problems and worked practice problems, a newline
    ends every text, answers are graded by exact match, and the checker above solves any problem."""
    stop = "\n"
    has_checker = True

    def __init__(self, n_heldout, seed):
        self.n_heldout, self.seed = n_heldout, seed

    def train_targets(self, rng):
        return train_targets(rng)                    # (domain, T, R*): R* is the answer itself

    def heldout(self):
        return [(d, t, a, a) for d, t, a in heldout_targets(self.n_heldout, seed=self.seed + 1000)]

    def practice_prompt(self, tok, target):
        return f"{BOS}{TARGET_MARK}{target}\n"        # `@T` on a fresh line opens a block of worked problems

    def parse(self, text):
        return from_worked(text)                     # `42+23+18=65+18=83` -> (`42+23+18=`, `83`)

    def as_written(self, text, prompt, answer):
        work, _, value = text.rpartition("=")        # the last step as written: `42+23+18=65+18=` and `83`
        return BOS + work + "=", value + "\n"

    def answer_prompt(self, tok, problem):
        return BOS + problem

    def answer_end(self, tok):
        return "\n"

    def answer_text(self, answer):
        return answer                                # R* is the answer already

    def is_correct(self, predicted, answer):
        return predicted == answer

    def same_answer(self, a, b):
        return a == b

    def random_examples(self, rng, target, m):
        return [sample_problem(rng, rng.choice(DOMAIN_NAMES)) for _ in range(m)]   # train split: never T

    def solve(self, problem):
        return solve(problem)

    def domain_of(self, problem):
        return domain_of(problem)

    def relation(self, problem, target):
        return relation(problem, target)

    def oracle_examples(self, rng, target, m):
        """m true practice problems related to T, never T itself: its reordering and neighbours, half each."""
        terms = terms_of(target)
        problems = [problem_text(reordered(terms) if i % 2 == 0 else moved(terms, rng)) for i in range(m)]
        return [(p, solve(p)) for p in problems]


if __name__ == "__main__":
    rng = random.Random(0)
    for d in DOMAIN_NAMES:
        p, a = sample_problem(rng, d)
        print(f"{d:8s} {p}{a:5s} worked: {worked(terms_of(p))}   reordered: {worked(reordered(terms_of(p)))}")
    print("a pretraining block:\n" + pretraining_item(rng, block_share=1.0))
