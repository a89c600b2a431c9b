"""
Tests on tiny random models (2 layers, width 32), each against an independent reference.

    python -m pytest -q
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers.models.llama import modeling_llama

import base_model
import generator
import room
import tasks
from inner_loop import adapt, encode, forward, init_lora, inner_loss, lora_targets
from meta_step import (attribution, example_features, generator_reward, outer_loss, reinforce_surrogate,
                       training_pairs)
from scorer import N_SCALARS, Scorer, weights_from_scores
from stats import auc, sign_test

HERE = os.path.dirname(os.path.abspath(__file__))
TOY = tasks.ToyWorld(n_heldout=12, seed=0)


@pytest.fixture(scope="module")
def tok():
    return base_model.build_tokenizer()


def tiny_model(tok, dtype=torch.float32):
    model = base_model.build_model(len(tok), hidden=32, layers=2, heads=2, intermediate=64, seed=0)
    return model.to(dtype).eval().requires_grad_(False)


@pytest.fixture
def model(tok):
    return tiny_model(tok)


@pytest.fixture
def model64(tok, monkeypatch):
    """A float64 model with transformers' float32 upcasts (RMSNorm, eager softmax) taken out, for finite differences."""
    def rms_norm(self, h):
        return self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    softmax = torch.nn.functional.softmax
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm)
    monkeypatch.setattr(torch.nn.functional, "softmax",
                        lambda x, dim=None, dtype=None: softmax(x, dim=dim, dtype=None if x.dtype == torch.float64 else dtype))
    return tiny_model(tok, torch.float64)


def problem(tok, m=4):
    """A target and m training examples of the toy world, encoded."""
    examples = [("23+45=", "68"), ("24+45=", "69"), ("7*12=", "84"), ("C(5,2)=", "10"), ("17%5=", "2")][:m]
    batch = encode(tok, [tasks.BOS + p for p, _ in examples], [a + "\n" for _, a in examples])
    return batch, encode(tok, [tasks.BOS + "22+45="], ["67\n"])


def random_adapter(model, rank=2, seed=1, dtype=torch.float32):
    """An adapter with B != 0, so that it changes the model."""
    phi = init_lora(model, lora_targets(model), rank, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return {n: (p + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype)).to(dtype) for n, p in phi.items()}


# ----------------------------------------------------------------------------- functional LoRA

def test_lora_with_B_zero_gives_base_logits(model, tok):
    ids = tok("\n23+45=68\n", return_tensors="pt")["input_ids"]
    phi = init_lora(model, lora_targets(model), rank=2)
    assert torch.equal(forward(model, [phi], 2.0, ids), model(input_ids=ids).logits)


def test_lora_equals_explicitly_merged_weight(model, tok):
    ids = tok("\n23+45=68\n", return_tensors="pt")["input_ids"]
    phi, scale = random_adapter(model), 1.5
    merged = base_model.build_model(len(tok), hidden=32, layers=2, heads=2, intermediate=64)
    merged.load_state_dict(model.state_dict())
    for name in lora_targets(model):   # W' = W + scale * B @ A, written into a copy of the model
        merged.get_submodule(name).weight.data += scale * phi[f"{name}.B"] @ phi[f"{name}.A"]
    assert torch.allclose(forward(model, [phi], scale, ids), merged(input_ids=ids).logits, atol=1e-5)
    assert not torch.allclose(forward(model, [phi], scale, ids), model(input_ids=ids).logits, atol=1e-3)


def test_lora_rank_larger_than_layer_is_refused(model):
    with pytest.raises(ValueError, match="rank"):
        init_lora(model, lora_targets(model), rank=33)


# ----------------------------------------------------------------------------- the inner loop

def test_unrolled_loop_lowers_weighted_inner_loss(model, tok):
    batch, _ = problem(tok)
    w = torch.tensor([1.0, 0.5, 2.0, 1.0])
    phis = adapt(model, random_adapter(model), 1.0, batch, w, alpha=0.05, K=5)
    losses = [inner_loss(model, phi, 1.0, batch, w).item() for phi in phis]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_zero_weight_example_has_no_effect(model, tok):
    batch, _ = problem(tok)
    w = torch.tensor([1.0, 0.0, 1.0, 1.0])
    other = {k: v.clone() for k, v in batch.items()}
    other["ids"][1] = batch["ids"][3]           # a different example in the zero-weight slot
    other["mask"][1] = batch["mask"][3]
    phi0 = random_adapter(model)
    a = adapt(model, phi0, 1.0, batch, w, alpha=0.05, K=3)[-1]
    b = adapt(model, phi0, 1.0, other, w, alpha=0.05, K=3)[-1]
    assert all(torch.allclose(a[n], b[n], atol=1e-7) for n in a)
    still = adapt(model, phi0, 1.0, batch, torch.zeros(4), alpha=0.05, K=3)[-1]
    assert all(torch.equal(still[n], phi0[n]) for n in phi0)   # all weights 0: no update at all


# ----------------------------------------------------------------------------- meta-gradients

@pytest.mark.parametrize("K", [1, 2])
@pytest.mark.parametrize("mode", ["unroll", "replay"])
def test_meta_gradient_matches_finite_differences(model64, tok, K, mode):
    batch, target = problem(tok)
    phi0 = random_adapter(model64, dtype=torch.float64)
    w = torch.tensor([1.0, 0.7, 1.3, 0.9], dtype=torch.float64)
    _, g = attribution(model64, phi0, 1.0, batch, w, target, alpha=0.1, K=K, mode=mode)
    eps, fd = 1e-5, torch.zeros_like(w)
    for i in range(len(w)):
        e = torch.zeros_like(w)
        e[i] = eps
        L = lambda w_: outer_loss(model64, adapt(model64, phi0, 1.0, batch, w_, 0.1, K)[-1], 1.0, target).item()
        fd[i] = (L(w + e) - L(w - e)) / (2 * eps)
    assert (g - fd).norm() / fd.norm() < 1e-5, (g, fd)


@pytest.mark.parametrize("K", [1, 2, 5])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_replay_equals_unroll(model64, tok, K, clip):
    batch, target = problem(tok)
    phi0 = random_adapter(model64, dtype=torch.float64)
    w = torch.tensor([1.0, 0.7, 1.3, 0.9], dtype=torch.float64)
    L1, g1 = attribution(model64, phi0, 1.0, batch, w, target, 0.1, K, "unroll", clip)
    L2, g2 = attribution(model64, phi0, 1.0, batch, w, target, 0.1, K, "replay", clip)
    assert torch.allclose(L1, L2, rtol=1e-12) and (g1 - g2).norm() / g1.norm() < 1e-10


def test_clipped_meta_gradient_matches_finite_differences(model64, tok):
    batch, target = problem(tok)
    phi0 = random_adapter(model64, dtype=torch.float64)
    w, clip = torch.tensor([1.0, 0.7, 1.3, 0.9], dtype=torch.float64), 0.05
    norm = lambda g: torch.sqrt(sum((x * x).sum() for x in g))
    phi = {n: p.clone().requires_grad_() for n, p in phi0.items()}
    assert norm(torch.autograd.grad(inner_loss(model64, phi, 1.0, batch, w), list(phi.values()))) > clip  # it bites
    _, g = attribution(model64, phi0, 1.0, batch, w, target, 0.1, 2, "unroll", clip)
    L = lambda w_: outer_loss(model64, adapt(model64, phi0, 1.0, batch, w_, 0.1, 2, max_norm=clip)[-1], 1.0,
                              target).item()
    fd = torch.tensor([(L(w + 1e-5 * e) - L(w - 1e-5 * e)) / 2e-5 for e in torch.eye(4, dtype=torch.float64)])
    assert (g - fd).norm() / fd.norm() < 1e-5, (g, fd)


def test_meta_gradient_reaches_scorer(model, tok):
    batch, target = problem(tok)
    eta = Scorer(32, width=8)
    w = weights_from_scores(eta(torch.randn(4, N_SCALARS + 64)))
    assert torch.allclose(w, torch.ones(4))      # a fresh scorer gives uniform weights
    _, g = attribution(model, random_adapter(model), 1.0, batch, w, target, 0.05, 2)
    w.backward(g)                                  # eq. 4
    assert eta.net[-1].weight.grad.abs().sum() > 0


def test_features_of_worked_problems(model, tok):
    target = "12+30+5="
    lines = ["30+12+5=42+5=47", "12+30+5=42+5=47", "12+31+5=43+5=49", "30+12+5=42+5=48"]   # same; T; near; wrong
    examples = [{"line": line, "valid": True, "problem": p, "answer": a, "greedy": "47"}
                for line, (p, a) in zip(lines, map(TOY.parse, lines))]
    valid, prompts, answers, consistent = training_pairs(TOY, examples, target, "sample", tok)
    assert [e["line"] for e in valid] == [lines[0], lines[2], lines[3]]      # T itself is left out of the pool
    assert training_pairs(TOY, examples, target, "sample", tok, with_target=True)[0] == examples
    x = example_features(model, tok, TOY, target, valid, prompts, answers, consistent)
    assert x.shape == (3, N_SCALARS + 2 * 32)
    assert x[:, 4].tolist() == [1, -1, -1] and x[:, 5].tolist() == [-1, -1, -1]   # consistent with greedy; is T
    # the written problem's confidence is the base's log-prob of its last step's value, given the worked line
    batch = encode(tok, ["\n30+12+5=42+5="], ["48\n"])
    logp = -torch.nn.functional.cross_entropy(model(input_ids=batch["ids"]).logits[0, :-1], batch["ids"][0, 1:],
                                              reduction="none")[-3:].mean()
    assert x[2, 2].item() == pytest.approx(max(logp.item(), -10) / 2, abs=1e-5)


# ----------------------------------------------------------------------------- REINFORCE

def test_reinforce_matches_hand_computed_policy_gradient():
    logits = torch.tensor([0.2, -0.5, 1.0], requires_grad=True)   # a categorical policy over 3 actions
    actions, advantage = torch.tensor([0, 2, 2, 1]), torch.tensor([1.0, -0.5, 2.0, 0.3])
    logp = torch.log_softmax(logits, 0)[actions]
    reinforce_surrogate(logp, advantage).backward()
    pi = torch.softmax(logits.detach(), 0)
    # grad of log pi(a) wrt the logits is onehot(a) - pi; the surrogate is -(1/m) sum_i A_i log pi(a_i)
    expected = -sum(A * (torch.eye(3)[a] - pi) for a, A in zip(actions, advantage)) / len(actions)
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_generator_rewards():
    g, w = torch.tensor([-0.6, 0.2, 0.4]), torch.tensor([0.0, 1.0, 2.0])
    reward, advantage = generator_reward(g, w, "attribution", improvement=0.1)
    assert torch.allclose(reward, -g + 0.1) and torch.allclose(advantage, -g + 0.1)    # -g already has mean 0
    reward, advantage = generator_reward(g, w, "contribution", improvement=0.1)
    assert torch.allclose(reward, torch.tensor([0.0, -0.2, -0.8]) + 0.1)             # a weight-0 example earns 0
    assert torch.allclose(advantage, torch.tensor([0.0, -0.2, -0.8]) + 1 / 3 + 0.1)
    with pytest.raises(ValueError, match="generator reward"):
        generator_reward(g, w, "usefulness", 0.0)


def test_reinforce_gradient_is_zero_when_advantages_are_zero(model, tok):
    psi = {n: p.requires_grad_() for n, p in random_adapter(model).items()}
    logp = generator.log_prob(model, psi, 1.0, tok, TOY, "23+45=", ["24+45=69", "7*12=84"])
    assert logp.shape == (2,) and (logp < 0).all()
    reinforce_surrogate(logp, torch.zeros(2)).backward()
    assert all(p.grad is not None and p.grad.abs().max() == 0 for p in psi.values())


# ----------------------------------------------------------------------------- generation and statistics

def test_decode_sampling_is_seeded_and_stops_at_newline(model, tok):
    gen = lambda: torch.Generator().manual_seed(3)
    a = generator.decode(model, [], 1.0, tok, ["\n@1+2=\n", "\n@10*10=\n"], 12, temperature=1.0, gen=gen())
    b = generator.decode(model, [], 1.0, tok, ["\n@1+2=\n", "\n@10*10=\n"], 12, temperature=1.0, gen=gen())
    assert a == b and all("\n" not in t and len(t) <= 12 for t in a)


def test_statistics():
    assert auc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0 and auc([0.1, 0.9], [1, 0]) == 0.0
    assert sign_test([1.0] * 10) == pytest.approx(2 / 2 ** 10) and sign_test([1, -1]) == 1.0


# ----------------------------------------------------------------------------- end to end

def test_train_tiny_end_to_end(tmp_path, tiny_base):
    out = tmp_path / "run"
    shutil.copytree(tiny_base, out / "base")      # pretrained once for the session (conftest.py), reused here
    done = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--preset", "tiny", "--out", str(out),
                           "--diagnostic-targets", "3"], check=True, cwd=HERE, capture_output=True, text=True)
    assert "reusing the pretrained base model" in done.stdout
    for f in ["base/config.json", "eta.pt", "psi.pt", "metrics.jsonl", "results.json", "timings.json"]:
        assert (out / f).exists(), f
    assert set(json.loads((out / "timings.json").read_text())) == {"base model", "meta-training", "evaluation",
                                                                    "in all"}
    evaluated = sorted(out.glob("eval_*/target_*.json"))     # the first 3 targets' diagnostics have -g_i, no others
    assert [("base_useful" in json.loads(f.read_text())["diagnostics"]) for f in evaluated] == [True] * 3 + [False] * 9
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == {"no_adapt", "random_ttt", "self_uniform", "scorer_only", "mass", "oracle"}
    assert results["excludes_target"] is True and set(results["with_target"]) == {"mass_with_target",
                                                                                    "mass_with_target_vs_mass"}
    assert results["methods"]["no_adapt"]["overall"]["dnll"] == 0.0
    assert "dnll_answer" not in results["methods"]["no_adapt"]["overall"]   # R* is the answer: one measure
    assert results["methods"]["oracle"]["overall"]["n"] == 12
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4 and rows[-1]["valid"] > 0.3    # real meta-steps ran on parsed examples
    if importlib.util.find_spec("matplotlib"):                 # the two figures, when matplotlib is there
        assert (out / "gains_by_domain.png").stat().st_size > 0 and (out / "meta_training.png").stat().st_size > 0
    else:
        assert not (out / "gains_by_domain.png").exists()


def test_room_measures_every_pool(tmp_path, tok):
    base_model.save(tiny_model(tok), tok, str(tmp_path / "base"))
    subprocess.run([sys.executable, os.path.join(HERE, "room.py"), "--out", str(tmp_path), "--targets", "6",
                    "--m", "2", "--K", "1", "--alpha", "0.03", "--inner-clip", "0", "--max-new", "4"], check=True, cwd=HERE,
                   capture_output=True)
    pools = json.loads((tmp_path / "room_a0.03_K1_c0.0.json").read_text())["pools"]
    assert set(pools) == set(room.POOLS) >= {"own", "own_with_target", "own_correct", "oracle", "random"}
    assert all(pools[p]["all"]["n"] == 6 and pools[p]["all"]["dnll"] == pools[p]["all"]["dnll"] for p in pools)
    assert pools["oracle"]["all"]["dnll"] != 0.0     # true examples were trained on: the target's NLL moved


def test_room_generator_runs_the_meta_training_budget(tmp_path, tiny_base):
    shutil.copytree(tiny_base, tmp_path / "base")
    (tmp_path / "config.json").write_text(json.dumps({"meta_steps": 3, "meta_batch": 2, "log_every": 2, "m": 4}))
    subprocess.run([sys.executable, os.path.join(HERE, "room.py"), "--out", str(tmp_path), "--generator", "--m", "4",
                    "--max-new", "12"], check=True, cwd=HERE, capture_output=True)
    saved = json.loads((tmp_path / "room_generator_lr0.001_steps3.json").read_text())    # the run's psi-lr, steps
    assert (saved["meta_steps"], saved["meta_batch"]) == (3, 2)
    assert [r["step"] for r in saved["shares"]] == [2, 3]              # every --log-every steps and the last
    assert all(0 <= r["correct"] <= r["valid"] <= 1 for r in saved["shares"])
