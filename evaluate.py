"""
Held-out test-time adaptation: every method on the same targets, per domain and overall.

  no_adapt      the base model answers T as it is
  random_ttt    LoRA steps on m random training problems with true answers (the paper's naive baseline)
  self_uniform  the untrained generator's examples (the base itself), uniform weights
  scorer_only   the untrained generator's examples (the same ones), weights from the trained scorer eta
  mass          the trained generator's examples (base + psi), weights from eta
  oracle        m true problems near T from the toy world (an upper bound, for reference)

Measures per target: dnll, the change of the answer's NLL (nats) after adaptation, and greedy accuracy.
Methods are compared paired on the same targets (mean, s.e., median, sign test).

    python evaluate.py --out runs/default    # re-evaluate a saved run
"""
import argparse
import json
import math
import os
import random
from types import SimpleNamespace

import torch

import base_model
import tasks
from generator import decode, synthesize
from inner_loop import adapt, encode
from meta_step import attribution, outer_loss, training_pairs
from scorer import Scorer, features, weights_from_scores

METHODS = ["no_adapt", "random_ttt", "self_uniform", "scorer_only", "mass", "oracle"]
PAIRS = [("mass", "self_uniform"), ("mass", "random_ttt"), ("mass", "no_adapt"), ("mass", "scorer_only"),
         ("scorer_only", "self_uniform"), ("self_uniform", "no_adapt"), ("oracle", "no_adapt")]


# ----------------------------------------------------------------------------- one target, every method

def scored(model, tok, eta, target, pool, cfg):
    """(prompts, answers, scorer weights, correct flags) of a generated pool, or None if nothing parsed."""
    valid, prompts, answers = training_pairs(pool, cfg.answer_with)
    if not valid:
        return None
    x = features(model, tok, target, [e["problem"] for e in valid], [a.strip() for a in answers],
                 [e["greedy"] for e in valid])
    with torch.no_grad():
        w = weights_from_scores(eta(x))
    return prompts, answers, w, [tasks.solve(e["problem"]) == a.strip() for e, a in zip(valid, answers)]


def evaluate_target(model, tok, eta, psi, phi0, cfg, target, answer, seed):
    """{method: (dnll, correct)} for one target, plus diagnostics of the generated pools."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    target_batch = encode(tok, [tasks.BOS + target], [answer + "\n"], model.device)
    base_pool = synthesize(model, {}, cfg.lora_scale, tok, target, cfg.m, cfg.temperature, cfg.max_new, gen)
    mass_pool = synthesize(model, psi, cfg.lora_scale, tok, target, cfg.m, cfg.temperature, cfg.max_new, gen)
    base, trained = scored(model, tok, eta, target, base_pool, cfg), scored(model, tok, eta, target, mass_pool, cfg)
    ones = lambda s: None if s is None else (s[0], s[1], torch.ones_like(s[2]))
    randoms = [tasks.sample_problem(rng, rng.choice(tasks.DOMAIN_NAMES)) for _ in range(cfg.m)]
    nearby = [tasks.nearby(target, rng) for _ in range(cfg.m)]
    data = {"no_adapt": None,
            "random_ttt": ([tasks.BOS + p for p, _ in randoms], [a + "\n" for _, a in randoms], torch.ones(cfg.m)),
            "self_uniform": ones(base), "scorer_only": base and base[:3], "mass": trained and trained[:3],
            "oracle": ([tasks.BOS + p for p in nearby], [tasks.solve(p) + "\n" for p in nearby], torch.ones(cfg.m))}
    with torch.no_grad():
        L_before = outer_loss(model, phi0, cfg.lora_scale, target_batch).item()
    result = {}
    for method, examples in data.items():
        phi = phi0
        if examples is not None:
            prompts, answers, w = examples
            phi = adapt(model, phi0, cfg.lora_scale, encode(tok, prompts, answers, model.device),
                        w.to(model.device), cfg.alpha, cfg.K, max_norm=cfg.inner_clip or None)[-1]
        with torch.no_grad():
            dnll = outer_loss(model, phi, cfg.lora_scale, target_batch).item() - L_before
        predicted = decode(model, [phi], cfg.lora_scale, tok, [tasks.BOS + target], cfg.max_new)[0]
        result[method] = (dnll, predicted == answer)
    return result, diagnostics(model, tok, phi0, cfg, target, target_batch, base_pool, mass_pool, base)


def diagnostics(model, tok, phi0, cfg, target, target_batch, base_pool, mass_pool, base):
    """What meta-training learned, on this target: pool quality, and how eta's weights rank examples."""
    d = {}
    for name, pool in (("base", base_pool), ("mass", mass_pool)):
        valid = [e for e in pool if e["valid"]]
        d[f"{name}_valid"] = len(valid) / len(pool)
        d[f"{name}_in_domain"] = sum(tasks.domain_of(e["problem"]) == tasks.domain_of(target)
                                     for e in valid) / len(pool)
        d[f"{name}_correct"] = sum(tasks.solve(e["problem"]) == e["answer"] for e in valid) / len(pool)
    if base is not None:
        prompts, answers, w, correct = base
        _, g = attribution(model, phi0, cfg.lora_scale, encode(tok, prompts, answers, model.device),
                           torch.ones_like(w), target_batch, cfg.alpha, cfg.K, cfg.meta_grad, cfg.inner_clip or None)
        d["auc_weights"] = auc(w.tolist(), correct)            # does eta rank correct above wrong examples?
        d["auc_attribution"] = auc((-g).tolist(), correct)     # does -g_i (helpfulness) rank them?
        d["corr_weights_attribution"] = correlation(w.tolist(), (-g).tolist())
    return d


# ----------------------------------------------------------------------------- statistics

def mean_se(xs):
    n = len(xs)
    if n == 0:
        return float("nan"), float("nan")
    mu = sum(xs) / n
    return mu, (math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n) if n > 1 else float("nan"))


def median(xs):
    s = sorted(xs)
    return float("nan") if not s else (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2


def sign_test(diffs):
    """Two-sided sign test p-value of 'the median difference is 0' (ties dropped)."""
    pos, neg = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n = pos + neg
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(pos, neg) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def auc(scores, labels):
    """P(score of a random positive > score of a random negative), ties count half; nan without both kinds."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return float("nan")
    return sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))


def correlation(xs, ys):
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def summary(rows):
    """n, acc, acc_se, dnll, dnll_se, dnll_median over a list of (dnll, correct)."""
    dnll, acc = [r[0] for r in rows], [float(r[1]) for r in rows]
    (a, a_se), (d, d_se) = mean_se(acc), mean_se(dnll)
    return {"n": len(rows), "acc": a, "acc_se": a_se, "dnll": d, "dnll_se": d_se, "dnll_median": median(dnll)}


def paired(per_target, a, b, keep):
    rows = [r for r in per_target if keep(r)]
    dd = [r[a][0] - r[b][0] for r in rows]
    da = [float(r[a][1]) - float(r[b][1]) for r in rows]
    (d, d_se), (x, x_se) = mean_se(dd), mean_se(da)
    return {"n": len(rows), "dnll_diff": d, "dnll_diff_se": d_se, "dnll_diff_median": median(dd),
            "sign_test_p": sign_test(dd), "acc_diff": x, "acc_diff_se": x_se}


def aggregate(per_target, domains, diags):
    base_wrong = lambda r: not r["no_adapt"][1]
    methods = {}
    for m in METHODS:
        methods[m] = {"overall": summary([r[m] for r in per_target]),
                      "by_domain": {d: summary([r[m] for r, dd in zip(per_target, domains) if dd == d])
                                    for d in sorted(set(domains), key=domains.index)},
                      "base_wrong": summary([r[m] for r in per_target if base_wrong(r)])}
    return {"methods": methods,
            "paired": {f"{a}_vs_{b}": paired(per_target, a, b, lambda r: True) for a, b in PAIRS},
            "paired_base_wrong": {f"{a}_vs_{b}": paired(per_target, a, b, base_wrong) for a, b in PAIRS},
            "learned": {k: float(torch.tensor([d[k] for d in diags if k in d]).nanmean()) for k in diags[0]}}


# ----------------------------------------------------------------------------- the whole evaluation

def run(model, tok, eta, psi, phi0, cfg, out):
    """Evaluates every method on cfg.eval_targets held-out targets; prints tables, writes results.json."""
    from tqdm import tqdm
    targets = tasks.heldout_targets(cfg.eval_targets, seed=cfg.seed + 1000)
    per_target, diags = [], []
    for i, (domain, target, answer) in enumerate(tqdm(targets, desc="evaluating", unit="target")):
        result, diag = evaluate_target(model, tok, eta, psi, phi0, cfg, target, answer, seed=cfg.seed + 10_000 + i)
        per_target.append(result)
        diags.append(diag)
    results = aggregate(per_target, [d for d, _, _ in targets], diags)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print_tables(results)
    print(f"wrote {os.path.join(out, 'results.json')}")
    return results


def print_tables(results):
    methods = results["methods"]
    domains = list(next(iter(methods.values()))["by_domain"])
    for key, title in (("dnll", "change of the answer's NLL after adaptation, nats (lower is better)"),
                       ("acc", "greedy accuracy")):
        print(f"\n{title}, mean ± s.e.")
        print(f"{'method':13s}" + "".join(f"{d[:12]:>15s}" for d in domains + ["overall"]))
        for m, r in methods.items():
            cells = [r["by_domain"][d] for d in domains] + [r["overall"]]
            print(f"{m:13s}" + "".join(f"{c[key]:+8.3f} ±{c[key + '_se']:5.3f}" for c in cells))
    print("\npaired, A minus B on the same targets: dnll mean ± s.e. [median, sign-test p]; accuracy")
    for name, p in results["paired"].items():
        print(f"  {name:26s} {p['dnll_diff']:+.3f} ± {p['dnll_diff_se']:.3f} [{p['dnll_diff_median']:+.3f}, "
              f"p={p['sign_test_p']:.2g}]   acc {p['acc_diff']:+.3f} ± {p['acc_diff_se']:.3f}")
    print("\nwhat meta-training learned: " + ", ".join(f"{k} {v:.3f}" for k, v in results["learned"].items()))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/default", help="a run folder written by train.py")
    parser.add_argument("--eval-targets", type=int, default=None, help="held-out targets (default: the run's)")
    args = parser.parse_args()
    with open(os.path.join(args.out, "config.json")) as f:
        cfg = SimpleNamespace(**{"inner_clip": 0.0, **json.load(f)})   # runs saved before --inner-clip existed
    cfg.lora_scale = cfg.lora_alpha / cfg.lora_rank
    cfg.eval_targets = args.eval_targets or cfg.eval_targets
    model, tok = base_model.load(os.path.join(args.out, "base"), cfg.device)
    eta = Scorer(model.config.hidden_size, cfg.scorer_width)
    eta.load_state_dict(torch.load(os.path.join(args.out, "eta.pt")))
    psi = torch.load(os.path.join(args.out, "psi.pt"))
    phi0 = torch.load(os.path.join(args.out, "phi0.pt"))
    run(model, tok, eta, psi, phi0, cfg, args.out)
