"""
A world: everything that differs between the embedded toy math world and real math data, behind one interface.

The method files (generator, scorer, inner loop, meta-step, evaluation) take a world as an argument and never ask
which one it is. Two implementations: `tasks.ToyWorld` (two-step problems and worked practice problems, with a
checker) and `math_data.MathWorld` (MATH / GSM8K JSONL, worked solutions). `config.make_world` picks one from the
settings. Adding a world means writing one class with these methods; no method file changes.

This file only states the interface (a typing.Protocol: nothing inherits from it, nothing checks it at run time).
"""
import random
from typing import Iterator, Optional, Protocol

Example = tuple[str, str]            # (p_i, a_i): a problem and its answer (or worked solution)
Target = tuple[str, str, str, str]   # (domain, T, R*, answer): R* is what L_out is measured on, answer what is graded


class World(Protocol):
    stop: Optional[str]      # what ends a generated text while sampling ("\n"; None: only the model's EOS)
    has_checker: bool        # can it check any problem's answer (toy world: oracle pools and correctness diagnostics)

    # ---- targets
    def train_targets(self, rng: random.Random) -> Iterator[tuple[str, str, str]]:
        """An endless stream of (domain, T, R*) meta-training targets, drawn with rng."""

    def heldout(self) -> list[Target]:
        """The held-out evaluation targets, always the same ones for the same settings."""

    # ---- step 1: the generator's prompt and what it writes
    def practice_prompt(self, tok, target: str) -> str:
        """The text the generator continues to write one practice example for T."""

    def parse(self, text: str) -> Optional[Example]:
        """(p_i, a_i) from one generated text, or None when it is no usable practice example."""

    def as_written(self, text: str, prompt: str, answer: str) -> Example:
        """The example as the generator wrote it, split into (context, continuation): what the scorer's "written"
        confidence features read. prompt, answer: the same example as it is trained on."""

    # ---- step 3 and 4: answering
    def answer_prompt(self, tok, problem: str) -> str:
        """The text an answer to `problem` follows (in SFT, in the outer loss and when answering T)."""

    def answer_end(self, tok) -> str:
        """The mark appended to every trained-on answer (and to R*): what teaches the model to stop."""

    def answer_text(self, answer: str) -> str:
        """The final answer alone as an R* (real data: \\boxed{answer}), for the NLL of the answer without its work;
        the answer itself where R* is already the answer (toy world)."""

    # ---- grading
    def is_correct(self, predicted: str, answer: str) -> bool:
        """Is a model's answer (as generated) right, against the target's reference answer."""

    def same_answer(self, a: str, b: str) -> bool:
        """Do two generated answers to one problem agree (the scorer's self-consistency feature)."""

    # ---- baselines
    def random_examples(self, rng: random.Random, target: str, m: int) -> list[Example]:
        """m random training problems with their true answers, never T itself (random_ttt's pool)."""

    # ---- the checker, where has_checker (the toy world); a diagnostic, never used in training
    def solve(self, problem: str) -> Optional[str]:
        """The true answer of any problem, None when it is malformed."""

    def domain_of(self, problem: str) -> Optional[str]:
        """The domain of any problem, None when it is malformed."""

    def relation(self, problem: str, target: str) -> Optional[str]:
        """How a practice problem relates to T: 'target' (T itself), 'same' (another problem with T's answer),
        'other'; None when it is malformed."""

    def oracle_examples(self, rng: random.Random, target: str, m: int) -> list[Example]:
        """m true examples related to T, never T itself: what a perfect generator writes."""
