"""
The embedded toy math world (the stand-in for MATH): problems, constructions, a checker, and `ToyWorld`, the world
interface of world.py for it.

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


# ----------------------------------------------------------------------------- the toy world, as a world (world.py)

class ToyWorld:
    """The toy world behind the interface in world.py: one-line problems and constructions, a newline ends every
    text, answers are graded by exact match, and the checker above solves any problem."""
    stop = "\n"
    has_checker = True

    def __init__(self, n_heldout, seed):
        self.n_heldout, self.seed = n_heldout, seed

    def train_targets(self, rng):
        return train_targets(rng)                    # (domain, T, R*): R* is the answer itself

    def heldout(self):
        return [(d, t, a, a) for d, t, a in heldout_targets(self.n_heldout, seed=self.seed + 1000)]

    def practice_prompt(self, tok, target):
        return f"{BOS}{TARGET_MARK}{target}\n"        # `@T` on a fresh line opens a block of constructions

    def parse(self, text):
        return from_construction(text)               # `35+23=58` -> (`x+23=58;x=`, `35`)

    def as_written(self, text, prompt, answer):
        lhs, _, value = text.rpartition("=")         # `35+23=58` as the prompt `35+23=` and its value `58`
        return BOS + lhs + "=", value + "\n"

    def answer_prompt(self, tok, problem):
        return BOS + problem

    def answer_end(self, tok):
        return "\n"

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

    def oracle_examples(self, rng, target, m):
        nearby_problems = [nearby(target, rng) for _ in range(m)]
        return [(p, solve(p)) for p in nearby_problems]


if __name__ == "__main__":
    rng = random.Random(0)
    for d in DOMAIN_NAMES:
        p, a = sample_problem(rng, d)
        print(f"{d:15s} {p}{a:5s} constructions: {'  '.join(nearby_constructions(p, rng, 3))}")
