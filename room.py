"""
How much room is there for MASS? The change of the target answer's NLL after K inner steps on fixed example pools,
with the toy world's checker standing in for a perfect scorer or a perfect generator. No meta-training: this
measures ceilings, the numbers that say what eta and psi could at best achieve on a given base and inner loop.
Every pool but own_with_target and own_target leaves out examples that are T itself, as the evaluation does.

  own              the base's worked problems, uniform weights (= self_uniform)
  own_with_target  the same with the examples that are T itself left in (what self-verification adds)
  own_target       weight 2 on the examples that are T itself, 0 on the rest (self-verification alone)
  own_greedy       own's problems, answered greedily by the base in one go (solving instead of working)
  own_correct      own's examples whose answer the checker says is right (a perfect scorer's filter)
  own_same         own's right examples with T's answer (reorderings of T): a perfect scorer that knows what helps
  own_true         own's problems with the checker's true answers (a generator whose arithmetic is always right)
  own_worked       own's problems worked again by the base, greedily (a generator that samples its problems and
                   works them out greedily, step by step)
  oracle           m true related problems, never T (world.oracle_examples: a reordering of T and neighbours)
  oracle_same      the reordering of T, m times, with its true answer
  random           m random training problems with true answers (= random_ttt)
  oracle_near      m neighbours of T (one number moved by 1 to 3), true answers: other answers than T's
  oracle_twin      m twins of T (two numbers moved so that T's answer stays, tasks.twin), true answers

    python room.py --out runs/default                        # the demo's base and inner loop, 300 targets
    python room.py --out runs/default --alpha 0.2             # any of the demo's settings, changed
    python room.py --out runs/default --generator             # how far psi can move in meta-training's budget
    python room.py --out runs/default --generator --psi-lr 3e-3               # the same at another learning rate
    python room.py --out runs/default --generator --meta-steps 600            # ... or with four times the steps

--generator measures the generator's room instead: psi trained from zero by the meta-training's REINFORCE (the same
estimator, baseline, Adam learning rate, targets per step and number of steps) with a perfect reward from the
checker, 1 for a right practice problem with T's answer that is not T (twins, the best pool above, are of this kind)
and 0 for any other, and no inner loop. What the generator's samples are, every --log-every steps, says how far a
reward that knows exactly which samples are of that kind could take psi in that budget.
"""
import argparse
import json
import math
import os
import random
import sys

import torch
from tqdm import tqdm

import base_model
import checkpoint
import config
import tasks
from generator import decode, log_prob, synthesize
from inner_loop import adapt, encode, init_lora, lora_targets
from meta_step import outer_loss, pool_quality, reinforce_surrogate
from stats import mean_se, median

POOLS = ["own", "own_with_target", "own_target", "own_greedy", "own_correct", "own_same", "own_true", "own_worked",
         "oracle", "oracle_same", "random", "oracle_near", "oracle_twin"]


def pools_for(model, tok, world, target, m, max_new, rng, gen):
    """The base's own examples and the pools of (problem, answer, weight) for one target (a pool may be empty).
    A filter keeps the whole pool and gives weight 2 to what it keeps and 0 to the rest: the most a scorer with
    w = 2 sigma(s) can do."""
    samples = synthesize(model, {}, 1.0, tok, world, target, m, 1.0, max_new, gen)
    own = [e for e in samples if e["valid"]]
    practice = [e for e in own if e["problem"] != target]
    right = lambda e: tasks.solve(e["problem"]) == e["answer"]
    keep = lambda e, kept: (e["problem"], e["answer"], 2.0 * kept)
    same = tasks.problem_text(tasks.reordered(tasks.terms_of(target)))
    randoms = [tasks.sample_problem(rng, rng.choice(tasks.DOMAIN_NAMES)) for _ in range(m)]
    steps = decode(model, [], 1.0, tok, [world.practice_prompt(tok, target) + e["problem"] for e in practice],
                   max_new, stop=world.stop) if practice else []          # `@T` and the problem: `=65+18=83`
    reworked = [world.parse(e["problem"] + rest) for e, rest in zip(practice, steps)]
    oracle = world.oracle_examples(rng, target, m)
    terms = tasks.terms_of(target)   # drawn after the oracle's, so the pools before them are as they were
    near = [tasks.problem_text(tasks.moved(terms, rng)) for _ in range(m)]
    twins = [tasks.problem_text(t) for t in (tasks.twin(terms, rng) for _ in range(m)) if t]
    return samples, {
        "own": [(e["problem"], e["answer"], 1.0) for e in practice],
        "own_with_target": [(e["problem"], e["answer"], 1.0) for e in own],
        "own_target": [keep(e, e["problem"] == target) for e in own],
        "own_greedy": [(e["problem"], e["greedy"], 1.0) for e in practice],
        "own_correct": [keep(e, right(e)) for e in practice],
        "own_same": [keep(e, right(e) and tasks.relation(e["problem"], target) == "same") for e in practice],
        "own_true": [(e["problem"], tasks.solve(e["problem"]), 1.0) for e in practice if tasks.solve(e["problem"])],
        "own_worked": [(e["problem"], w[1], 1.0) for e, w in zip(practice, reworked) if w],
        "oracle": [(p, a, 1.0) for p, a in oracle],
        "oracle_same": [(same, tasks.solve(same), 1.0)] * m,
        "random": [(p, a, 1.0) for p, a in randoms],
        "oracle_near": [(p, tasks.solve(p), 1.0) for p in near],
        "oracle_twin": [(p, tasks.solve(p), 1.0) for p in twins]}


def measure(args):
    model, tok = base_model.load(os.path.join(args.out, "base"))
    phi0 = init_lora(model, lora_targets(model, args.lora_modules), args.lora_rank, seed=args.seed + 1)
    scale = args.lora_alpha / args.lora_rank
    world, rows = tasks.ToyWorld(args.targets, args.seed), []
    for i, (domain, T, R, _) in enumerate(tqdm(world.heldout(), desc="room", unit="target")):
        rng, gen = random.Random(args.seed + 10_000 + i), torch.Generator().manual_seed(args.seed + 10_000 + i)
        target_batch = encode(tok, [tasks.BOS + T], [R + "\n"])
        with torch.no_grad():
            L_before = outer_loss(model, phi0, scale, target_batch).item()
        row = {"domain": domain, "base_right": decode(model, [], scale, tok, [tasks.BOS + T], args.max_new)[0] == R}
        samples, pools = pools_for(model, tok, world, T, args.m, args.max_new, rng, gen)
        row.update(pool_quality(world, T, samples))                             # the base's samples, checked
        row["has_same"] = float(row["same_answer"] > 0)
        right = lambda pool: sum(tasks.solve(p) == a for p, a, _ in pool) / args.m
        row["practice_right"], row["worked_right"] = right(pools["own"]), right(pools["own_worked"])
        for name, pool in pools.items():
            if not pool or not any(w for _, _, w in pool):    # nothing to train on: no update
                row[name], row[name + "_right"] = 0.0, row["base_right"]
                continue
            batch = encode(tok, [tasks.BOS + p for p, _, _ in pool], [a + "\n" for _, a, _ in pool])
            phi = adapt(model, phi0, scale, batch, torch.tensor([w for _, _, w in pool]), args.alpha, args.K,
                        max_norm=args.inner_clip or None)[-1]
            with torch.no_grad():
                row[name] = outer_loss(model, phi, scale, target_batch).item() - L_before
            row[name + "_size"] = len(pool)
            row[name + "_right"] = decode(model, [phi], scale, tok, [tasks.BOS + T], args.max_new)[0] == R
        rows.append(row)
    return rows


def generator_room(args, demo):
    """psi trained by REINFORCE with a perfect reward (the module's docstring), in the demo's budget; prints and
    returns the generator's shares (pool_quality) averaged over each --log-every steps."""
    model, tok = base_model.load(os.path.join(args.out, "base"))
    world = tasks.ToyWorld(args.targets, args.seed)
    psi = {n: p.requires_grad_() for n, p in init_lora(model, lora_targets(model, args.lora_modules), args.lora_rank,
                                                        seed=args.seed).items()}          # as train.py starts it
    opt = torch.optim.Adam(psi.values(), lr=demo.psi_lr)
    scale = args.lora_alpha / args.lora_rank
    stream, window, rows = world.train_targets(random.Random(args.seed)), [], []
    mean_of = lambda lines: {k: sum(line[k] for line in lines) / len(lines) for k in lines[0] if k != "step"}
    print(f"psi by REINFORCE with a perfect reward: {demo.meta_steps} steps of {demo.meta_batch} targets, "
          f"{args.m} samples each, Adam lr {demo.psi_lr}")
    for step in tqdm(range(1, demo.meta_steps + 1), desc="generator room", unit="step"):
        for i in range(demo.meta_batch):
            _, T, R = next(stream)
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + (step - 1) * demo.meta_batch + i)
            samples = synthesize(model, psi, scale, tok, world, T, args.m, demo.temperature, args.max_new, gen)
            window.append(pool_quality(world, T, samples))
            valid = [e for e in samples if e["valid"]]
            if not valid:
                continue
            reward = torch.tensor([float(e["problem"] != T and tasks.solve(e["problem"]) == e["answer"] == R)
                                   for e in valid])
            logp = log_prob(model, psi, scale, tok, world, T, [e["line"] for e in valid])
            (reinforce_surrogate(logp, reward - reward.mean()) / demo.meta_batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % demo.log_every == 0 or step == demo.meta_steps:
            rows.append({"step": step, **mean_of(window)})
            tqdm.write(" | ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()))
            window = []
    third = max(1, len(rows) // 3)   # the first and last thirds of the logged steps, each a mean of its lines
    first, last = mean_of(rows[:third]), mean_of(rows[-third:])
    print(f"first {third} lines -> last {third}: " + ", ".join(f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in first))
    return rows


def table(rows):
    """dnll mean ± s.e. per pool (columns), overall, on base-wrong targets and per domain (rows), medians in JSON;
    then the quality of the base's own pool."""
    subsets = {"all": rows, "base wrong": [r for r in rows if not r["base_right"]]}
    subsets.update({d: [r for r in rows if r["domain"] == d] for d in tasks.DOMAIN_NAMES})
    out, quality = {pool: {} for pool in POOLS}, {}
    print("\nchange of the target answer's NLL after the inner loop, nats; change of greedy accuracy; mean ± s.e.")
    print(f"{'targets':14s}{'n':>5s}" + "".join(f"{pool:>16s}" for pool in POOLS))
    for k, sub in subsets.items():
        dnll_cells, acc_cells = [], []
        for pool in POOLS:
            dnll = [r[pool] for r in sub]
            dacc = [float(r[pool + "_right"]) - float(r["base_right"]) for r in sub]
            (mu, se), (acc, acc_se) = mean_se(dnll), mean_se(dacc)
            out[pool][k] = {"n": len(sub), "dnll": mu, "dnll_se": se, "dnll_median": median(dnll),
                            "dacc": acc, "dacc_se": acc_se}
            dnll_cells.append(f"{mu:+9.3f} ±{se:5.3f}")
            acc_cells.append(f"{acc:+9.3f} ±{acc_se:5.3f}")
        print(f"{k[:14]:14s}{len(sub):5d}" + "".join(dnll_cells))
        print(f"{'  accuracy':14s}{'':5s}" + "".join(acc_cells))
    print("\nthe base and its own samples: greedy accuracy on T; shares of its m samples that parse, are right, are "
          "T itself, are right with T's answer without being T (same); share of targets with a 'same'; shares that "
          "are practice problems (not T) right as sampled, and right when the base works them again greedily")
    keys = ("base_right", "valid", "correct", "is_target", "same_answer", "has_same", "practice_right", "worked_right")
    print(f"{'targets':14s}{'n':>5s}" + "".join(f"{k:>15s}" for k in ("base acc", *keys[1:])))
    for k, sub in subsets.items():
        shares = [mean_se([float(r[key]) for r in sub])[0] for key in keys]
        quality[k] = dict(zip(("base_acc", *keys[1:]), shares))
        print(f"{k[:14]:14s}{len(sub):5d}" + "".join(f"{s:15.3f}" for s in shares))
    return out, quality


def check(parser, args):
    """Bad options exit 2, a run folder without a usable base exits 1, each in one line, before any work."""
    if args.psi_lr is not None and not (math.isfinite(args.psi_lr) and args.psi_lr > 0):
        parser.error(f"--psi-lr must be above 0, not {args.psi_lr}")
    if args.meta_steps is not None and args.meta_steps < 1:
        parser.error(f"--meta-steps must be at least 1, not {args.meta_steps}")
    for name, ok, what in (("targets", 1, "at least 1"), ("m", 1, "at least 1"), ("K", 1, "at least 1"),
                           ("max_new", 1, "at least 1"), ("lora_rank", 1, "at least 1"), ("inner_clip", 0, "at least 0"),
                           ("alpha", None, "above 0"), ("lora_alpha", None, "above 0")):
        value = getattr(args, name)
        if not (math.isfinite(value) and (value > 0 if ok is None else value >= ok)):
            parser.error(f"--{name.replace('_', '-')} must be {what}, not {value}")
    try:
        checkpoint.check_writable(args.out)
        base_model.check(os.path.join(args.out, "base"), args.lora_modules, args.lora_rank, option="--out")
    except (ValueError, OSError) as e:
        config.refuse("room.py", e)


def main(argv):
    parser = config.Parser(prog="room.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    demo = config.Config()                                   # defaults: the demo's settings (train.py --help)
    parser.add_argument("--out", default=demo.out, help="a run folder with a pretrained base/ (train.py)")
    parser.add_argument("--targets", type=int, default=demo.eval_targets,
                        help="held-out targets, balanced over the domains")
    parser.add_argument("--seed", type=int, default=demo.seed)
    parser.add_argument("--m", type=int, default=demo.m, help="examples per pool")
    parser.add_argument("--K", type=int, default=demo.K, help="inner steps")
    parser.add_argument("--alpha", type=float, default=demo.alpha, help="inner learning rate")
    parser.add_argument("--inner-clip", type=float, default=demo.inner_clip, help="inner gradient-norm clip (0: off)")
    parser.add_argument("--lora-modules", default=demo.lora_modules)
    parser.add_argument("--lora-rank", type=int, default=demo.lora_rank)
    parser.add_argument("--lora-alpha", type=float, default=demo.lora_alpha)
    parser.add_argument("--max-new", type=int, default=demo.max_new)
    parser.add_argument("--generator", action="store_true", help="the generator's room instead (see above), in "
                        "the meta-training budget and psi-lr of the run's config.json (the demo's without one)")
    parser.add_argument("--psi-lr", type=float, default=None, help="--generator: this Adam learning rate instead")
    parser.add_argument("--meta-steps", type=int, default=None, help="--generator: this many steps instead")
    args = parser.parse_args(argv)
    check(parser, args)
    torch.manual_seed(args.seed)
    if args.generator:   # the run's meta-training budget (its config.json; without one, the demo's)
        demo = config.of_run(args.out)
        demo.psi_lr, demo.meta_steps = args.psi_lr or demo.psi_lr, args.meta_steps or demo.meta_steps
        rows = generator_room(args, demo)
        path = os.path.join(args.out, f"room_generator_lr{demo.psi_lr}_steps{demo.meta_steps}.json")
        with open(path, "w") as f:
            json.dump({"settings": vars(args), "psi_lr": demo.psi_lr, "meta_steps": demo.meta_steps,
                       "meta_batch": demo.meta_batch, "shares": rows}, f, indent=1)
        print(f"wrote {path}")
        return
    pools, quality = table(measure(args))
    result = {"settings": vars(args), "pools": pools, "own_pool": quality}
    modules = "" if args.lora_modules == "auto" else "_" + args.lora_modules.replace(",", "+")
    name = f"room_a{args.alpha}_K{args.K}_c{args.inner_clip}{modules}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main(sys.argv[1:])
