"""
Problems: the embedded toy math world (the stand-in for MATH) and answer checking.

Six domains, each a toy version of a MATH subject. A problem is one line of text ending in '=', its answer
an integer: `23+45=` -> `68`. Every domain has a seeded sampler, `nearby()` (a problem close to a given one,
the kind of practice problem a good generator writes) and a checker that solves ANY well-formed problem
text of that domain, so synthetic examples can be checked for diagnostics. The checker never feeds training.

    python tasks.py        # prints a few problems of each domain
"""
import random
import re
import zlib

BOS = "\n"           # every sequence starts on a fresh line
TARGET_MARK = "@"    # '@T' opens a block of practice problems written for target T

# ----------------------------------------------------------------------------- the domains
# Each domain: a pattern for well-formed problems, the solver of any such problem (None: no integer answer),
# and a sampler of the "pretraining range". A problem outside that range is still well-formed and solvable.

def _angle(a, b):
    return 180 - a - b if a + b < 180 else None

def _linear(a, b, c):
    return (c - b) // a if a and (c - b) % a == 0 and c >= b else None

DOMAINS = {  # name: (pattern, solver, sampler)
    "prealgebra": (r"(\d+)\+(\d+)=|(\d+)-(\d+)=",      # 2-digit addition and subtraction
                   lambda a, b, c, d: a + b if a is not None else (c - d if c >= d else None),
                   lambda r: (lambda a, b: f"{a}+{b}=" if r.random() < 0.5 else f"{max(a, b)}-{min(a, b)}=")(
                       r.randint(10, 99), r.randint(10, 99))),
    "arithmetic": (r"(\d+)\*(\d+)=", lambda a, b: a * b,   # one digit times two digits
                   lambda r: f"{r.randint(2, 9)}*{r.randint(10, 99)}="),
    "number_theory": (r"(\d+)%(\d+)=", lambda a, b: a % b if b else None,   # remainders
                      lambda r: f"{r.randint(10, 99)}%{r.randint(2, 9)}="),
    "algebra": (r"(\d+)x\+(\d+)=(\d+);x=", _linear,       # solve a*x+b=c for x
                lambda r: (lambda a, x, b: f"{a}x+{b}={a * x + b};x=")(r.randint(2, 9), r.randint(1, 12),
                                                                      r.randint(1, 20))),
    "counting": (r"mul\((\d+),(\d+)\)=", lambda d, n: n // d if d else None,   # multiples of d up to n
                 lambda r: f"mul({r.randint(2, 9)},{r.randint(10, 99)})="),
    "geometry": (r"tri\((\d+),(\d+)\)=", _angle,          # the third angle of a triangle, in degrees
                 lambda r: (lambda a: f"tri({a},{r.randint(10, 170 - a - 10)})=")(r.randint(10, 140))),
}
DOMAIN_NAMES = list(DOMAINS)
_PATTERNS = {d: re.compile(pattern) for d, (pattern, _, _) in DOMAINS.items()}


def domain_of(problem):
    """The domain whose syntax `problem` follows, or None (a malformed problem)."""
    for d, pattern in _PATTERNS.items():
        if pattern.fullmatch(problem):
            return d
    return None


def solve(problem):
    """The true answer of any well-formed problem text, as a string; None if malformed or unsolvable."""
    d = domain_of(problem)
    if d is None:
        return None
    groups = [None if g is None else int(g) for g in _PATTERNS[d].fullmatch(problem).groups()]
    answer = DOMAINS[d][1](*groups)
    return None if answer is None else str(answer)


def is_heldout(problem):
    """A fixed, seed-free split: about 1 problem in 5 is held out, decided by a hash of its text."""
    return zlib.crc32(problem.encode()) % 5 == 0


def sample_problem(rng, domain, split="train"):
    """A (problem, answer) pair of `domain` from `split` ('train' or 'heldout'); the two are disjoint."""
    while True:
        problem = DOMAINS[domain][2](rng)
        if is_heldout(problem) == (split == "heldout"):
            return problem, solve(problem)


def nearby(problem, rng, spread=3):
    """A solvable problem of the same form whose numbers each differ from `problem`'s by at most `spread`."""
    for _ in range(200):
        candidate = re.sub(r"\d+", lambda n: str(max(1, int(n.group()) + rng.randint(-spread, spread))), problem)
        if candidate != problem and solve(candidate) is not None:
            return candidate
    raise ValueError(f"no solvable problem within {spread} of {problem!r}")


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


if __name__ == "__main__":
    rng = random.Random(0)
    for d in DOMAIN_NAMES:
        p, a = sample_problem(rng, d)
        q = nearby(p, rng)
        print(f"{d:14s} {p}{a:6s} nearby: {q}{solve(q)}")
