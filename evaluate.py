"""
Held-out test-time adaptation: every method on the same targets, per domain and overall.

  no_adapt      the base model answers T as it is
  random_ttt    LoRA steps on m random training problems with true answers (the paper's naive baseline)
  self_uniform  the untrained generator's examples (the base itself), uniform weights
  scorer_only   the untrained generator's examples (the same ones), weights from the trained scorer eta
  mass          the trained generator's examples (base + psi), weights from eta
  oracle        m true problems near T, from a world with a checker (the toy world; a reference, not a bound)

Pools never hold an example whose problem is T itself (meta_step.training_pairs): training on a guessed answer to
T is self-verification, not learning from practice problems. What such examples would add is its own comparison,
`with_target` in results.json: mass_with_target is mass with them left in the pool.

Measures per target: dnll, the change of the answer's NLL (nats) after adaptation, and greedy accuracy.
Methods are compared paired on the same targets (mean, s.e., median, sign test).

The held-out targets, the prompts, the grading and the random_ttt pool come from the world (world.py). Real data
(--eval-data, MATH/GSM8K JSONL): dnll is on the reference solution (or \\boxed{answer}, --outer-target), domains are
subjects, and oracle and the checker's diagnostics are n/a.

    python evaluate.py --out runs/default    # re-evaluate a saved run
    python evaluate.py --model DIR --eval-data math500_test.jsonl --limit 5    # no run: untrained scorer, psi = 0
"""
import argparse
import dataclasses
import json
import os
import random
import sys

import torch
from tqdm import tqdm

import base_model
import checkpoint
import config
import data_parallel
import plots
from generator import decode, synthesize
from inner_loop import adapt, encode, init_lora, lora_targets
from meta_step import attribution, example_features, outer_loss, pool_quality, target_batch, training_pairs
from scorer import Scorer, weights_from_scores
from stats import auc, correlation, paired, summary

METHODS = ["no_adapt", "random_ttt", "self_uniform", "scorer_only", "mass", "oracle"]
WITH_TARGET = "mass_with_target"   # a comparison apart from METHODS: mass with the examples that are T itself
PAIRS = [("mass", "self_uniform"), ("mass", "random_ttt"), ("mass", "no_adapt"), ("mass", "scorer_only"),
         ("scorer_only", "self_uniform"), ("self_uniform", "no_adapt"), ("oracle", "no_adapt")]
NOT_APPLICABLE = {"oracle": "this world has no checker to write true problems near T (the toy world has one)",
                  "scorer_only": "no trained scorer: its weights would be uniform, the same as self_uniform",
                  "mass": "no trained scorer or generator: the same as self_uniform"}


def methods_for(world, trained):
    """The methods that make sense: oracle needs a world with a checker; scorer_only and mass a meta-trained run."""
    return [m for m in METHODS + [WITH_TARGET] if not (m == "oracle" and not world.has_checker)
            and not (m in ("scorer_only", "mass", WITH_TARGET) and not trained)]


# ----------------------------------------------------------------------------- one target, every method

def scored(model, tok, world, eta, target, pool, cfg, with_target=False):
    """(prompts, answers, scorer weights, correct flags) of a generated pool, or None if nothing is left to train on.
    Correct flags come from the world's checker (None without one)."""
    valid, prompts, answers, consistent = training_pairs(world, pool, target, cfg.answer_with, tok, with_target)
    if not valid:
        return None
    x = example_features(model, tok, world, target, valid, prompts, answers, consistent)
    with torch.no_grad():
        w = weights_from_scores(eta(x))
    correct = [world.solve(e["problem"]) == a.strip() for e, a in zip(valid, answers)] if world.has_checker else None
    return prompts, answers, w, correct


def as_sft(tok, world, examples):
    """(prompts, answers, uniform weights) of fixed (problem, answer) examples, ready for the inner loop."""
    end = world.answer_end(tok)
    return ([world.answer_prompt(tok, p) for p, _ in examples], [a + end for _, a in examples],
            torch.ones(len(examples)))


def evaluate_target(model, tok, world, eta, psi, phi0, cfg, methods, target, reference, answer, seed,
                    attributed=True):
    """{method: (dnll, correct)} for one target, plus diagnostics of the generated pools; (dnll, correct,
    dnll_answer) where R* is more than the answer (a worked solution): dnll_answer is the change of the answer's NLL
    alone. reference: R*, the text dnll is measured on; answer: what a greedy answer is graded against (the same in
    the toy world). attributed: the diagnostics include -g_i of each pool (diagnostics())."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    T_batch = target_batch(world, tok, target, reference, cfg.max_len, model.device)
    sample = lambda adapter: synthesize(model, adapter, cfg.lora_scale, tok, world, target, cfg.m, cfg.temperature,
                                        cfg.max_new, gen)
    base_pool = sample({})
    mass_pool = sample(psi) if "mass" in methods else None
    base = scored(model, tok, world, eta, target, base_pool, cfg)
    trained = mass_pool and scored(model, tok, world, eta, target, mass_pool, cfg)
    has_target = mass_pool and any(e["valid"] and e["problem"] == target for e in mass_pool)
    with_target = scored(model, tok, world, eta, target, mass_pool, cfg, with_target=True) if has_target else None
    ones = lambda s: None if s is None else (s[0], s[1], torch.ones_like(s[2]))
    data = {"no_adapt": None, "random_ttt": as_sft(tok, world, world.random_examples(rng, target, cfg.m)),
            "self_uniform": ones(base), "scorer_only": base and base[:3], "mass": trained and trained[:3],
            WITH_TARGET: with_target and with_target[:3]}
    if "oracle" in methods:
        data["oracle"] = as_sft(tok, world, world.oracle_examples(rng, target, cfg.m))
    # real data: also the NLL of the final answer alone (\boxed{answer}), when R* is a worked solution
    alone = world.answer_text(answer)
    A_batch = target_batch(world, tok, target, alone, cfg.max_len, model.device) if alone != reference else None
    nll = lambda phi, batch: None if batch is None else outer_loss(model, phi, cfg.lora_scale, batch).item()
    with torch.no_grad():
        L_before, A_before = nll(phi0, T_batch), nll(phi0, A_batch)
    phis = {}   # step 3: each method's adapter (phi_0 where it has nothing to train on)
    for method in methods:
        if method == WITH_TARGET and not has_target:   # no example is T itself: mass's pool, so mass's adapter
            phis[method] = phis["mass"]
            continue
        phis[method] = phi0
        if data[method] is not None:
            prompts, answers, w = data[method]
            phis[method] = adapt(model, phi0, cfg.lora_scale, encode(tok, prompts, answers, model.device, cfg.max_len),
                                 w.to(model.device), cfg.alpha, cfg.K, max_norm=cfg.inner_clip or None)[-1]
    # step 4: every distinct adapter answers T greedily, all in one batch (a row each)
    distinct = list({id(phi): phi for phi in phis.values()}.values())
    predicted = decode(model, [], cfg.lora_scale, tok, [world.answer_prompt(tok, target)] * len(distinct),
                       cfg.max_new, stop=world.stop, per_row=distinct)
    answer_of = {id(phi): text for phi, text in zip(distinct, predicted)}
    result = {}
    with torch.no_grad():
        for method, phi in phis.items():
            result[method] = (nll(phi, T_batch) - L_before, world.is_correct(answer_of[id(phi)], answer))
            if A_batch is not None:
                result[method] += (nll(phi, A_batch) - A_before,)
    return result, diagnostics(model, tok, world, phi0, cfg, target, T_batch, base_pool, mass_pool, base, trained,
                               attributed)


def diagnostics(model, tok, world, phi0, cfg, target, T_batch, base_pool, mass_pool, base, trained, attributed=True):
    """What meta-training learned, on this target: the quality of the untrained (base_) and trained (mass_)
    generator's samples, and how eta's weights rank examples. Without a checker (real data): the valid share only.
    attributed: also -g_i of each pool (a meta-gradient each: the useful share, auc_attribution)."""
    d = {}
    for name, pool, kept in (("base", base_pool, base), ("mass", mass_pool, trained)):
        if pool is None:
            continue
        if not world.has_checker:
            d[f"{name}_valid"] = sum(e["valid"] for e in pool) / len(pool)
            continue
        d.update({f"{name}_{k}": v for k, v in pool_quality(world, target, pool).items()})
        d[f"{name}_in_domain"] = sum(e["valid"] and world.domain_of(e["problem"]) == world.domain_of(target)
                                     for e in pool) / len(pool)
        if name == "base" and kept is not None:
            d["auc_weights"] = auc(kept[2].tolist(), kept[3])           # does eta rank correct above wrong examples?
        if kept is not None and attributed:   # useful: -g_i > 0 under uniform weights, a step on example i lowers L_out
            _, g = attribution(model, phi0, cfg.lora_scale, encode(tok, kept[0], kept[1], model.device),
                               torch.ones_like(kept[2]), T_batch, cfg.alpha, cfg.K, cfg.meta_grad,
                               cfg.inner_clip or None)
            d[f"{name}_useful"] = (g < 0).float().mean().item()
            if name == "base":
                d["auc_attribution"] = auc((-g).tolist(), kept[3])     # does -g_i (helpfulness) rank them?
                d["corr_weights_attribution"] = correlation(kept[2].tolist(), (-g).tolist())
    return d


# ----------------------------------------------------------------------------- all targets: tables and results.json

def aggregate(per_target, domains, diags):
    base_wrong = lambda r: not r["no_adapt"][1]
    methods = {}
    pairs = [(a, b) for a, b in PAIRS if a in per_target[0] and b in per_target[0]]
    for m in per_target[0]:
        methods[m] = {"overall": summary([r[m] for r in per_target]),
                      "by_domain": {d: summary([r[m] for r, dd in zip(per_target, domains) if dd == d])
                                    for d in sorted(set(domains), key=domains.index)},
                      "base_wrong": summary([r[m] for r in per_target if base_wrong(r)])}
    results = {"excludes_target": True,    # no pool in "methods" holds an example that is T itself
               "methods": {m: v for m, v in methods.items() if m != WITH_TARGET},
               "paired": {f"{a}_vs_{b}": paired(per_target, a, b, lambda r: True) for a, b in pairs},
               "paired_base_wrong": {f"{a}_vs_{b}": paired(per_target, a, b, base_wrong) for a, b in pairs},
               "learned": {k: float(torch.tensor([d[k] for d in diags if k in d]).nanmean())
                           for k in sorted({k for d in diags for k in d})}}
    if WITH_TARGET in methods:   # the self-verification comparison: what T itself in the pool adds to mass
        results["with_target"] = {WITH_TARGET: methods[WITH_TARGET],
                                  f"{WITH_TARGET}_vs_mass": paired(per_target, WITH_TARGET, "mass", lambda r: True)}
    return results


# ----------------------------------------------------------------------------- the whole evaluation

def run(model, tok, world, eta, psi, phi0, cfg, out, trained=True, rank=0, ranks=1):
    """Evaluates every method that makes sense on the world's held-out targets; prints tables, writes results.json.
    trained: eta and psi come from meta-training (else only no_adapt, random_ttt and self_uniform are run).
    rank, ranks: under torchrun, this rank evaluates every ranks-th target and rank 0 gathers, prints and writes
    (the other ranks return None); a target's result depends only on its index, so results.json is the same."""
    methods = methods_for(world, trained)
    targets = world.heldout()
    # a file per finished target in OUT/eval_<fingerprint>: a rerun continues where a kill stopped (checkpoint.py)
    folder = checkpoint.eval_folder(out, checkpoint.fingerprint(eta.state_dict(), psi, phi0))
    done = checkpoint.start_eval(folder, checkpoint.eval_settings(dataclasses.asdict(cfg)), write=rank == 0)
    if done and rank == 0:
        print(f"continuing the evaluation in {folder}: {len(done)} of its targets already done")
    mine = []
    for i in tqdm(range(rank, len(targets), ranks), desc="evaluating", unit="target", disable=rank > 0):
        _, target, reference, answer = targets[i]
        if i in done and done[i]["target"] == target:
            mine.append((done[i]["result"], done[i]["diagnostics"]))
            continue
        if i in done:
            raise checkpoint.Refused(f"{folder}: its target {i} is not target {i} now; remove it to start over")
        result, diags = evaluate_target(model, tok, world, eta, psi, phi0, cfg, methods, target, reference, answer,
                                        seed=cfg.seed + 10_000 + i, attributed=i < cfg.diagnostic_targets)
        checkpoint.save_eval_target(folder, i, {"target": target, "result": result, "diagnostics": diags})
        mine.append((result, diags))
    if ranks > 1:   # torchrun: every rank's results, in the targets' order
        mine = data_parallel.in_order(data_parallel.gather(mine), len(targets))
        if rank > 0:
            return None
    per_target, diags = [r for r, _ in mine], [d for _, d in mine]
    results = aggregate(per_target, [t[0] for t in targets], diags)
    results["not_applicable"] = {m: NOT_APPLICABLE[m] for m in METHODS if m not in methods}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json.tmp"), "w") as f:
        json.dump(results, f, indent=1)
    os.replace(os.path.join(out, "results.json.tmp"), os.path.join(out, "results.json"))   # a kill leaves no half file
    print_tables(results)
    print(f"wrote {os.path.join(out, 'results.json')}")
    figures = plots.draw(out)
    print(f"wrote {', '.join(figures)}" if figures else "no figures: matplotlib is not installed (optional)")
    return results


def print_tables(results):
    """One table per measure: a row per domain (subject) and overall, a column per method."""
    methods = results["methods"]
    domains = list(next(iter(methods.values()))["by_domain"])
    worked = "dnll_answer" in next(iter(methods.values()))["overall"]   # R* is a worked solution (real data)
    tables = [("dnll", f"change of {'the reference solution' if worked else 'the answer'}'s NLL after adaptation, "
                       "nats (lower is better)"),
              ("dnll_answer", "change of the final answer's NLL alone, nats (lower is better)"),
              ("acc", "greedy accuracy")]
    for key, title in [(k, t) for k, t in tables if k != "dnll_answer" or worked]:
        print(f"\n{title}, mean ± s.e.")
        print(f"{'domain':24s}{'n':>5s}" + "".join(f"{m:>16s}" for m in methods))
        for d in domains + ["overall"]:
            cells = [r["overall"] if d == "overall" else r["by_domain"][d] for r in methods.values()]
            print(f"{d[:24]:24s}{cells[0]['n']:5d}" + "".join(f"{c[key]:+9.3f} ±{c[key + '_se']:5.3f}" for c in cells))
    for m, why in results["not_applicable"].items():
        print(f"{m}: n/a ({why})")
    if "with_target" in results:
        p = results["with_target"][f"{WITH_TARGET}_vs_mass"]
        print(f"\nnot in the pools above: examples that are T itself. Letting them into mass's pool "
              f"({WITH_TARGET} minus mass): dnll {p['dnll_diff']:+.3f} ± {p['dnll_diff_se']:.3f}, "
              f"accuracy {p['acc_diff']:+.3f} ± {p['acc_diff_se']:.3f}")
    print("\npaired, A minus B on the same targets: dnll mean ± s.e. [median, sign-test p]; accuracy")
    for name, p in results["paired"].items():
        answer = (f"   answer alone {p['dnll_answer_diff']:+.3f} ± {p['dnll_answer_diff_se']:.3f}"
                  if "dnll_answer_diff" in p else "")
        print(f"  {name:26s} {p['dnll_diff']:+.3f} ± {p['dnll_diff_se']:.3f} [{p['dnll_diff_median']:+.3f}, "
              f"p={p['sign_test_p']:.2g}]   acc {p['acc_diff']:+.3f} ± {p['acc_diff_se']:.3f}{answer}")
    print("\nwhat meta-training learned: " + ", ".join(f"{k} {v:.3f}" for k, v in results["learned"].items()))


# ----------------------------------------------------------------------------- the command line, checked before any work

def untrained(cfg):
    """No run folder: the --model with an untrained scorer (uniform weights), psi = 0, phi_0 as train.py makes it."""
    model, tok = base_model.load(cfg.model, cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)      # eta's initial weights, as in train.py: a rerun evaluates the same eta
    eta = Scorer(model.config.hidden_size, cfg.scorer_width).to(cfg.device)
    phi0 = init_lora(model, lora_targets(model, cfg.lora_modules), cfg.lora_rank, seed=cfg.seed + 1)
    return model, tok, eta, {}, phi0


def trained_run(cfg, out):
    """A train.py run folder's base, eta, psi and phi_0."""
    model, tok = base_model.load(cfg.model or os.path.join(out, "base"), cfg.device, cfg.dtype)
    learned = {}
    for name in ("eta", "psi", "phi0"):
        try:
            learned[name] = torch.load(os.path.join(out, f"{name}.pt"), map_location=cfg.device, weights_only=True)
        except Exception as e:   # whatever the unpickler raises: one line naming the file
            raise ValueError(f"{os.path.join(out, name + '.pt')}: not readable ({type(e).__name__})") from None
    eta = Scorer(model.config.hidden_size, cfg.scorer_width).to(cfg.device)
    eta.load_state_dict(learned["eta"])
    return model, tok, eta, learned["psi"], learned["phi0"]


def run_settings(args):
    """The settings of the train.py run in --out, with --eval-targets and --limit applied; ValueError names the
    folder or file when it is not a finished train.py run."""
    if not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out}: no such folder (give a train.py run folder, or --model)")
    for name in ("config.json", "eta.pt", "psi.pt", "phi0.pt"):
        if not os.path.isfile(os.path.join(args.out, name)):
            raise ValueError(f"--out {args.out}: no {name} there, so no train.py run to evaluate")
    try:
        cfg = config.of_run(args.out)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{os.path.join(args.out, 'config.json')}: not a train.py config ({type(e).__name__})") from None
    cfg.out, cfg.eval_targets = args.out, args.eval_targets or cfg.eval_targets
    cfg.limit = args.limit if args.limit is not None else cfg.limit
    return cfg


def cli(argv):
    """Bad options exit 2, a bad run folder, model or data file exits 1, each with one line, before any work."""
    parser = config.Parser(prog="evaluate.py", description=__doc__, allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/default", help="a run folder written by train.py")
    parser.add_argument("--eval-targets", type=int, default=None, help="held-out targets (default: the run's)")
    parser.add_argument("--limit", type=int, default=None, help="real data: the first N rows (default: the run's)")
    parser.add_argument("--model", default=None, help="no run folder: this local Hugging Face causal LM (a folder or "
                        ".gguf file) with an untrained scorer and psi = 0; every train.py setting applies, --out "
                        "defaults to runs/eval")
    args, rest = parser.parse_known_args(argv)
    if args.model:   # every train.py setting, from the command line (later ones win)
        cfg = config.parse_args(["--out", "runs/eval", "--meta-steps", "0", *argv])
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)} (train.py's settings need --model)")
    if args.eval_targets is not None and args.eval_targets < 1:
        parser.error(f"--eval-targets must be at least 1, not {args.eval_targets}")
    if args.limit is not None and args.limit < 0:
        parser.error(f"--limit must be at least 0, not {args.limit}")
    try:
        cfg = cfg if args.model else run_settings(args)
        cfg.device = config.pick_device(cfg.device)
        checkpoint.check_writable(cfg.out)
        base = cfg.model or os.path.join(cfg.out, "base")
        base_model.check(base, cfg.lora_modules, cfg.lora_rank, "--model" if cfg.model else "--out")
        world = config.make_world(cfg)
        model, tok, eta, psi, phi0 = untrained(cfg) if args.model else trained_run(cfg, cfg.out)
    except (ValueError, OSError) as e:
        config.refuse("evaluate.py", e)
    try:
        run(model, tok, world, eta, psi, phi0, cfg, cfg.out, trained=not args.model)
    except checkpoint.Refused as e:   # a partial evaluation of the same eta and psi with other settings
        config.refuse("evaluate.py", e)


if __name__ == "__main__":
    cli(sys.argv[1:])
