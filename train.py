"""
MASS end to end: build and pretrain the base model, meta-train the scorer eta and the generator adapter psi,
then evaluate test-time adaptation on held-out targets.

    python train.py                  # the embedded demo: everything under runs/default
    python train.py --preset tiny    # the same path on a tiny configuration, in seconds
    python train.py --model DIR --data math_train.jsonl --eval-data math500_test.jsonl   # docs/real_models.md
    python train.py --help           # every setting
    torchrun --nproc_per_node=2 train.py --preset tiny   # data-parallel over 2 processes, the same eta and psi
Stopped part-way (Ctrl-C, a kill)? The same command continues from the last checkpoint in --out
(docs/reliability.md), and a killed evaluation from its last finished target.
"""
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import base_model
import checkpoint
import config
import data_parallel
import evaluate
from inner_loop import init_lora, lora_targets
from meta_step import meta_step
from scorer import Scorer


# ----------------------------------------------------------------------------- inputs, checked before any work

def check_inputs(cfg):
    """Everything that can be refused before any work starts; raises ValueError (or OSError) whose message names the
    file and line, or the option. Only reads: nothing is created or changed. Returns the world (config.make_world
    reads and checks the data files) and the checkpoint to continue from (None when there is none)."""
    checkpoint.check_writable(cfg.out)
    world = config.make_world(cfg)
    base = os.path.join(cfg.out, "base")
    if cfg.model or os.path.exists(os.path.join(base, "config.json")):
        base_model.check(cfg.model or base, cfg.lora_modules, cfg.lora_rank)
    if not cfg.model:
        check_pretraining(cfg, base)
    return world, checkpoint.read(cfg.out, dataclasses.asdict(cfg))


# what makes the toy base: a cached OUT/base records them (base/pretraining.json), and is reused only with the same
PRETRAINING = ("hidden", "layers", "heads", "intermediate", "pretrain_steps", "pretrain_batch", "pretrain_lr",
               "pretrain_mix", "block_share")


def check_pretraining(cfg, base):
    """Refuse (ValueError, one line) to reuse a cached toy base pretrained with other settings than cfg's. A base
    saved before bases recorded their settings (no pretraining.json) is reused as it is."""
    path = os.path.join(base, "pretraining.json")
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            saved = json.load(f)
    except ValueError:
        raise ValueError(f"{path}: not readable JSON; remove {base} to pretrain the base anew") from None
    changed = checkpoint.changed_settings(saved, {k: getattr(cfg, k) for k in PRETRAINING if k in saved})
    if changed:
        raise ValueError(f"{base}: a base pretrained with other settings ({'; '.join(changed)}); give its settings, "
                         f"another --out, or remove {base} to pretrain anew")


def load_or_pretrain_base(cfg):
    """The base model, pretrained once and cached in OUT/base; a second run reuses it. It is saved into base.tmp and
    renamed, so a kill mid-save leaves no half-written base to reuse."""
    folder = os.path.join(cfg.out, "base")
    if os.path.exists(os.path.join(folder, "config.json")):
        print(f"reusing the pretrained base model in {folder}")
        return base_model.load(folder, cfg.device, cfg.dtype)
    tok = base_model.build_tokenizer()
    model = base_model.build_model(len(tok), cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate, seed=cfg.seed)
    base_model.pretrain(model.to(cfg.device), tok, cfg.pretrain_steps, cfg.pretrain_batch, lr=cfg.pretrain_lr,
                        block_share=cfg.block_share, seed=cfg.seed, device=cfg.device, mix=cfg.pretrain_mix)
    for unfinished in (folder + ".tmp", folder):      # left by a kill mid-save (folder: no config.json in it)
        shutil.rmtree(unfinished, ignore_errors=True)
    base_model.save(model, tok, folder + ".tmp")
    with open(os.path.join(folder + ".tmp", "pretraining.json"), "w") as f:   # what made it (check_pretraining)
        json.dump({k: getattr(cfg, k) for k in PRETRAINING}, f, indent=1)
    os.replace(folder + ".tmp", folder)
    return base_model.load(folder, cfg.device, cfg.dtype)


def load_base(cfg, rank, ranks):
    """The base model on every rank: a --model, or the toy base (pretrained by rank 0 under torchrun, while the
    other ranks wait at a barrier and then load what it saved)."""
    if rank == 0 or cfg.model:
        model, tok = base_model.load(cfg.model, cfg.device, cfg.dtype) if cfg.model else load_or_pretrain_base(cfg)
    if ranks > 1:
        dist.barrier()
        if rank > 0 and not cfg.model:
            model, tok = base_model.load(os.path.join(cfg.out, "base"), cfg.device, cfg.dtype)
    return model, tok


# ----------------------------------------------------------------------------- what meta-training learns and keeps

def learned_parts(model, cfg):
    """The scorer eta, the generator adapter psi (B = 0, so the generator starts as the base), phi_0 (the inner
    adapter's fixed start, A random and B = 0) and Adam on eta and on psi."""
    targets = lora_targets(model, cfg.lora_modules)
    torch.manual_seed(cfg.seed)      # eta's initial weights: the same whether the base was pretrained now or loaded
    eta = Scorer(model.config.hidden_size, cfg.scorer_width).to(cfg.device)
    psi = {n: p.requires_grad_() for n, p in init_lora(model, targets, cfg.lora_rank, seed=cfg.seed).items()}
    phi0 = init_lora(model, targets, cfg.lora_rank, seed=cfg.seed + 1)
    eta_opt, psi_opt = torch.optim.Adam(eta.parameters(), lr=cfg.eta_lr), torch.optim.Adam(psi.values(), lr=cfg.psi_lr)
    return eta, psi, phi0, eta_opt, psi_opt


def fresh_state():
    return {"step": 0,               # meta-steps done
            "skipped_steps": 0,      # how many of them skipped their update
            "running": {"improvement": 0.0,    # running mean of L_before - L_after, the improvement reward's baseline
                        "g_norm": None},       # running mean of |dL_out/dw|, the typical scale of the attribution
            "window": {"rows": [], "seconds": [], "skipped_steps": 0}}   # what the next summary line averages


def save_checkpoint(cfg, state, rng, eta, psi, phi0, eta_opt, psi_opt):
    """eta.pt, psi.pt, phi0.pt (what evaluate.py --out reads), then OUT/checkpoint.pt, everything needed to continue."""
    psi_cpu = {n: p.detach().cpu() for n, p in psi.items()}
    for name, obj in (("eta", eta.state_dict()), ("psi", psi_cpu), ("phi0", phi0)):
        checkpoint.save(os.path.join(cfg.out, f"{name}.pt"), obj)
    checkpoint.save(os.path.join(cfg.out, "checkpoint.pt"), {
        **state, "config": dataclasses.asdict(cfg), "eta": eta.state_dict(), "psi": psi_cpu,
        "eta_opt": eta_opt.state_dict(), "psi_opt": psi_opt.state_dict(), "rng": checkpoint.rng_states(rng)})


def restore(saved, rng, eta, psi, eta_opt, psi_opt):
    """The state of a checkpoint, its eta, psi and Adam states loaded and its RNG states restored."""
    eta.load_state_dict(saved["eta"])
    with torch.no_grad():
        for n, p in psi.items():
            p.copy_(saved["psi"][n])
    eta_opt.load_state_dict(saved["eta_opt"])
    psi_opt.load_state_dict(saved["psi_opt"])
    checkpoint.restore_rng_states(saved["rng"], rng)
    return {k: saved[k] for k in fresh_state()}


def update(rows, params, running, eta_opt, psi_opt):
    """One Adam step of eta and psi, only when some target parsed and every loss and gradient is finite (else eta,
    psi and the running means stay as they are). Returns whether it updated."""
    learned = [r for r in rows if not r["skipped"]]
    grads = [p.grad for p in params if p.grad is not None]
    finite = all(math.isfinite(r[k]) for r in learned for k in ("L_before", "L_after", "surrogate", "g_norm"))
    ok = bool(learned) and finite and all(torch.isfinite(g).all() for g in grads)
    if ok:
        for r in learned:   # the running means move once per step, so every target of a step sees the same ones
            running["improvement"] = ema(running["improvement"], r["improvement"])
            running["g_norm"] = ema(running["g_norm"], r["g_norm"])
        eta_opt.step()
        psi_opt.step()
    eta_opt.zero_grad(set_to_none=True)
    psi_opt.zero_grad(set_to_none=True)
    return ok


# ----------------------------------------------------------------------------- the run

def main(cfg, ready=None):
    """ready: what check_inputs(cfg) returned (checked here when not given)."""
    world, saved = ready or check_inputs(cfg)
    cfg.device = config.pick_device(cfg.device)
    rank, ranks, cfg.device = data_parallel.start(cfg.device)   # torchrun: this process's rank, of ranks; alone 0, 1
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        settings = json.dumps(dataclasses.asdict(cfg), indent=1)
        checkpoint.atomic_write(os.path.join(cfg.out, "config.json"), lambda f: f.write(settings.encode()))
    clock = [("start", time.time())]
    model, tok = load_base(cfg, rank, ranks)
    clock.append(("base model", time.time()))
    eta, psi, phi0 = meta_train(model, tok, world, cfg, saved, rank, ranks)
    clock.append(("meta-training", time.time()))
    # held-out evaluation of every method (torchrun: each rank takes every ranks-th target; rank 0 writes)
    evaluate.run(model, tok, world, eta, {n: p.detach() for n, p in psi.items()}, phi0, cfg, cfg.out, rank=rank,
                 ranks=ranks)
    clock.append(("evaluation", time.time()))
    if rank == 0:   # what this command took, phase by phase (a continued run: only what it did itself)
        took = {name: round(t - t_before, 1) for (_, t_before), (name, t) in zip(clock, clock[1:])}
        took["in all"] = round(clock[-1][1] - clock[0][1], 1)
        checkpoint.atomic_write(os.path.join(cfg.out, "timings.json"), lambda f: f.write(json.dumps(took).encode()))
        print("took " + ", ".join(f"{name} {minutes(s)}" for name, s in took.items()) + " (timings.json)")
    if ranks > 1:
        dist.destroy_process_group()


def minutes(seconds):
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60:02d} s"


def meta_train(model, tok, world, cfg, saved, rank=0, ranks=1):
    """The meta-training loop: each step, a meta-batch of targets, one meta_step each, then one Adam step of eta
    and psi. Continues from `saved` (a checkpoint) when given. Returns eta, psi and phi_0."""
    eta, psi, phi0, eta_opt, psi_opt = learned_parts(model, cfg)
    rng = random.Random(cfg.seed)    # the stream of meta-training targets draws from it alone
    state = fresh_state()
    if saved:
        state = restore(saved, rng, eta, psi, eta_opt, psi_opt)
        if rank == 0:
            print(f"continuing from the checkpoint at meta-step {state['step']} in {cfg.out}")
    stream = world.train_targets(rng)
    log_path = os.path.join(cfg.out, "metrics.jsonl")
    if rank == 0:
        checkpoint.keep_logged_lines(log_path, state["step"])
    log = open(log_path if rank == 0 else os.devnull, "a")   # torchrun: rank 0 logs
    stop = checkpoint.stop_signals(announce=rank == 0)
    params = [*eta.parameters(), *psi.values()]
    bar = tqdm(range(state["step"] + 1, cfg.meta_steps + 1), initial=state["step"], total=cfg.meta_steps,
               desc="meta-training", unit="step", disable=rank > 0)
    for step in bar:
        start = time.time()
        rows = []
        if ranks > 1:                # torchrun: a row per target for its gradient
            per_target = torch.zeros(cfg.meta_batch, sum(p.numel() for p in params), device=cfg.device)
        for i in range(cfg.meta_batch):
            _, target, reference = next(stream)
            if i % ranks != rank:    # torchrun: each rank takes every ranks-th target of the meta-batch
                continue
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + (step - 1) * cfg.meta_batch + i)
            rows.append(meta_step(model, tok, world, eta, psi, phi0, target, reference, cfg, gen,
                                  state["running"], grad_scale=1 / cfg.meta_batch))
            if ranks > 1:            # torchrun: this target's gradient, kept apart for the sum in target order
                per_target[i] = data_parallel.take_grads(params)
        stopping = list(stop)        # a signal arriving from here on is seen after the next step
        if ranks > 1:                # torchrun: one all-reduce of the gradients; every target's rows on every rank
            data_parallel.sum_grads(per_target, params)
            gathered = data_parallel.gather((rows, stopping))
            rows = data_parallel.in_order([r for r, _ in gathered], cfg.meta_batch)
            stopping = [s for _, signals in gathered for s in signals][:1]
        updated = update(rows, params, state["running"], eta_opt, psi_opt)
        state["step"], window = step, state["window"]
        if not updated:
            state["skipped_steps"] += 1
            window["skipped_steps"] += 1
        window["rows"] += rows if updated else [r for r in rows if r["skipped"]]   # a skipped step's losses: no means
        window["seconds"].append(time.time() - start)
        too_many = False
        if step % cfg.log_every == 0 or step == cfg.meta_steps:
            row = {"step": step, "targets": step * cfg.meta_batch, **summarize(window["rows"]),
                   "skipped_steps": window["skipped_steps"],
                   "sec_per_step": sum(window["seconds"]) / len(window["seconds"])}
            log.write(json.dumps(row) + "\n")
            log.flush()
            if rank == 0:
                bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            state["window"] = {"rows": [], "seconds": [], "skipped_steps": 0}
            too_many = state["skipped_steps"] > cfg.max_skip_share * step
        if rank == 0 and (step % cfg.checkpoint_every == 0 or too_many or stopping):   # torchrun: rank 0 writes
            save_checkpoint(cfg, state, rng, eta, psi, phi0, eta_opt, psi_opt)
        if too_many or stopping:
            log.close()
            checkpoint.default_signals()
        if too_many:
            sys.exit(f"stopped at meta-step {step}: {state['skipped_steps']} meta-steps skipped their update (no "
                     f"target parsed, or a non-finite loss or gradient), more than --max-skip-share "
                     f"{cfg.max_skip_share} of them; see {log_path}; the checkpoint in {cfg.out} continues the run"
                     if rank == 0 else 1)
        if stopping:
            if rank == 0:
                print(f"stopped at meta-step {step}: the same command continues from the checkpoint", file=sys.stderr)
            sys.exit(128 + stopping[0])
    checkpoint.default_signals()
    log.close()
    state["step"] = cfg.meta_steps
    if rank == 0:
        save_checkpoint(cfg, state, rng, eta, psi, phi0, eta_opt, psi_opt)
        print(f"saved eta, psi and phi_0 in {cfg.out}; meta-training log in {log_path}")
    return eta, psi, phi0


def ema(mean, x, rate=0.05):
    return x if mean is None else mean + rate * (x - mean)


def summarize(window):
    """Means over the targets since the last summary line (nan-aware), and the count of skipped targets."""
    done = [r for r in window if not r["skipped"]]
    keys = [k for k in (done[0] if done else {}) if k != "skipped"]
    mean = lambda k: float(torch.tensor([r[k] for r in done], dtype=torch.float64).nanmean())
    return {**{k: mean(k) for k in keys}, "skipped": sum(r["skipped"] for r in window)}


def cli(argv):
    """The command line: bad options exit 2 and bad files exit 1, each with one line on stderr, before any work."""
    cfg = config.parse_args(argv, description=__doc__)
    try:
        ready = check_inputs(cfg)
    except (ValueError, OSError) as e:
        config.refuse("train.py", e)
    try:
        main(cfg, ready)
    except checkpoint.Refused as e:   # a partial evaluation of these eta and psi with other settings
        config.refuse("train.py", e)


if __name__ == "__main__":
    cli(sys.argv[1:])
