"""
Tests of the worlds (world.py): the toy world's parsing, checker and split (tasks.py), and a third world written
here, which runs through the meta-step and the evaluation with no method file changed.

    python -m pytest -q test_worlds.py
"""
import random
import re

import pytest
import torch

import base_model
import config
import evaluate
import tasks
from inner_loop import init_lora, lora_targets
from meta_step import meta_step
from scorer import Scorer
from test_mass import TOY, tiny_model


@pytest.fixture
def tok():
    return base_model.build_tokenizer()


@pytest.fixture
def model(tok):
    return tiny_model(tok)


# ----------------------------------------------------------------------------- the toy world

@pytest.mark.parametrize("line", ["", "23+45", "=68", "23+45=68", "23+45+12=", "23+45+12=80", "23+45+12=68+12=8x",
                                  "hello=3", "23++45+1=69+1=70", "@23+45+12=68+12=80", "x+23=58;x=35"])
def test_malformed_generations_parse_as_invalid(line):
    assert TOY.parse(line) is None


def test_a_worked_problem_parses_into_the_problem_and_its_final_answer():
    assert TOY.parse("42+23+18=65+18=83") == ("42+23+18=", "83")
    assert TOY.parse("4*44+49=176+49=225") == ("4*44+49=", "225")
    problem, answer = TOY.parse("42+23+18=66+18=84")   # a wrong step: a well-formed example, a wrong answer
    assert tasks.solve(problem) == "83" != answer
    assert TOY.as_written("42+23+18=65+18=83", "\n42+23+18=", "83\n") == ("\n42+23+18=65+18=", "83\n")


def test_checker_solves_every_domain_and_related_problems_are_what_they_say():
    rng = random.Random(0)
    for d in tasks.DOMAIN_NAMES:
        for _ in range(50):
            p, a = tasks.sample_problem(rng, d)
            terms = tasks.terms_of(p)
            assert tasks.domain_of(p) == d and tasks.solve(p) == a
            assert TOY.parse(tasks.worked(terms)) == (p, a)
            same = tasks.problem_text(tasks.reordered(terms))
            near = tasks.problem_text(tasks.moved(terms, rng))
            assert same != p and tasks.solve(same) == a and tasks.relation(same, p) == "same"
            assert near != p and tasks.relation(near, p) in ("other", "same") and tasks.relation(p, p) == "target"
            twin = tasks.problem_text(tasks.twin(terms, rng))
            assert twin != p and tasks.domain_of(twin) == d and tasks.relation(twin, p) == "same"
            oracle = TOY.oracle_examples(rng, p, 4)
            assert all(q != p and tasks.solve(q) == x for q, x in oracle)
    assert tasks.solve("12*3+5=") == "41" and tasks.solve("70-17+20=") == "73" and tasks.solve("10-17+5=") is None
    assert tasks.solve("7x=") is None and tasks.relation("7x=", "12*3+5=") is None


@pytest.mark.parametrize("mix", list(tasks.MIXES))
def test_pretraining_items_are_right_and_in_the_mix_shares(mix):
    """Every line of pretraining text is true arithmetic; one-go answers come at the mix's share; second steps
    (seen as a left number of 100 or more, which no first step has) only where the mix has them."""
    rng, one_go, second, single = random.Random(0), 0, 0, 0
    for _ in range(4000):
        item = tasks.pretraining_item(rng, 0.35, mix)
        if item.startswith(tasks.TARGET_MARK):
            for line in item.splitlines()[1:]:
                problem, answer = TOY.parse(line)
                assert tasks.solve(problem) == answer
            continue
        single += 1
        left, answer = item.strip().split("=")
        if tasks.terms_of(left + "="):
            assert tasks.solve(left + "=") == answer
            one_go += 1
        else:
            assert str(eval(left)) == answer
            second += int(re.match(r"\d+", left)[0]) >= 100
    assert abs(one_go / single - tasks.MIXES[mix]["one_go"]) < 0.03
    assert (second > 0.02 * single) == tasks.MIXES[mix]["second_steps"]


def test_train_and_heldout_are_disjoint():
    rng = random.Random(0)
    train = {tasks.sample_problem(rng, d)[0] for d in tasks.DOMAIN_NAMES for _ in range(200)}
    heldout = {p for _, p, _ in tasks.heldout_targets(300, seed=0)}
    assert not train & heldout and len(heldout) == 300


# ----------------------------------------------------------------------------- a third world

WORDS = ["abc", "xyz", "hello", "mass", "lora", "meta", "world", "token"]


class ReverseWorld:
    """A world written only here, to show that the method files need no change for a new one (world.py): a problem
    is a word, its answer the word reversed; any generated text of two or more characters is a practice example."""
    stop = "\n"
    has_checker = False

    def train_targets(self, rng):
        while True:
            word = rng.choice(WORDS)
            yield "reverse", word, word[::-1]

    def heldout(self):
        return [("reverse", w, w[::-1], w[::-1]) for w in WORDS[:3]]

    def practice_prompt(self, tok, target):
        return f"\n#{target}\n"

    def parse(self, text):
        return (text, text[::-1]) if len(text.strip()) >= 2 else None

    def as_written(self, text, prompt, answer):
        return prompt, answer

    def answer_prompt(self, tok, problem):
        return f"\n{problem}>"

    def answer_end(self, tok):
        return "\n"

    def answer_text(self, answer):
        return answer

    def is_correct(self, predicted, answer):
        return predicted == answer

    def same_answer(self, a, b):
        return a == b

    def random_examples(self, rng, target, m):
        return [(w, w[::-1]) for w in (rng.choice([w for w in WORDS if w != target]) for _ in range(m))]


def test_a_new_world_runs_through_meta_step_and_evaluation_unchanged(model, tok, tmp_path):
    world = ReverseWorld()
    cfg = config.parse_args(["--preset", "tiny", "--m", "3", "--max-new", "6", "--out", str(tmp_path)])
    eta, phi0 = Scorer(32, cfg.scorer_width), init_lora(model, lora_targets(model), cfg.lora_rank, seed=1)
    psi = {n: p.requires_grad_() for n, p in init_lora(model, lora_targets(model), cfg.lora_rank, seed=0).items()}
    _, target, reference = next(world.train_targets(random.Random(0)))
    row = meta_step(model, tok, world, eta, psi, phi0, target, reference, cfg, torch.Generator().manual_seed(0),
                    {"improvement": 0.0, "g_norm": None}, grad_scale=1.0)
    assert row["skipped"] == 0 and row["valid"] > 0 and "correct" not in row     # no checker, no correctness
    assert eta.net[-1].weight.grad.abs().sum() > 0 and all(p.grad is not None for p in psi.values())
    results = evaluate.run(model, tok, world, eta, {n: p.detach() for n, p in psi.items()}, phi0, cfg, str(tmp_path))
    assert set(results["methods"]) == {"no_adapt", "random_ttt", "self_uniform", "scorer_only", "mass"}
    assert "oracle" in results["not_applicable"] and results["methods"]["mass"]["overall"]["n"] == 3
    assert results["methods"]["random_ttt"]["overall"]["dnll"] != 0.0                # it adapted on its pool
