"""
MASS end to end: build and pretrain the base model, meta-train the scorer eta and the generator adapter psi,
then evaluate test-time adaptation on held-out targets.

    python train.py                  # the embedded demo: everything under runs/default
    python train.py --preset tiny    # the same path on a tiny configuration, in seconds
    python train.py --model DIR --data math_train.jsonl --eval-data math500_test.jsonl   # a real LM (README)
    python train.py --help           # every setting
    torchrun --nproc_per_node=2 train.py --preset tiny   # data-parallel over 2 processes, the same eta and psi
Stopped part-way (Ctrl-C, a kill)? The same command continues from the last checkpoint in --out (README: Reliability).
"""
import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import base_model
import checkpoint
import data_parallel
import evaluate
import tasks
from inner_loop import init_lora, lora_targets
from meta_step import meta_step
from scorer import Scorer


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # run
    out: str = arg("runs/default", "folder for everything the run writes (base model, checkpoints, logs, results)")
    preset: str = arg("default", "default | tiny (seconds, for tests) | full (longer, larger)")
    seed: int = arg(0, "seed of every random choice")
    device: str = arg("cpu", "torch device: cpu | cuda | auto (cuda when available)")
    dtype: str = arg("float32", "float32 | bfloat16: the base model's weights (adapters and scorer stay float32)")
    # a real model and real data (instead of the toy base and world)
    model: str = arg("", "a local Hugging Face causal LM folder, used instead of building and pretraining the toy base")
    data: str = arg("", "MATH/GSM8K JSONL of meta-training targets, instead of the toy world")
    eval_data: str = arg("", "MATH/GSM8K JSONL of held-out targets (default: the --data rows, which are not held out)")
    limit: int = arg(0, "real data: evaluate the first N rows of the evaluation file (0: --eval-targets of them)")
    outer_target: str = arg("solution", "real data: L_out on the reference solution | answer (\\boxed{answer} alone)")
    max_len: int = arg(1024, "longest sequence in a loss, in tokens; a longer one loses its tail (a long solution)")
    # base model (the stand-in for a pretrained LLM)
    hidden: int = arg(128, "hidden size of the tiny Llama")
    layers: int = arg(4, "transformer layers")
    heads: int = arg(4, "attention heads")
    intermediate: int = arg(512, "MLP width")
    pretrain_steps: int = arg(2400, "pretraining steps on the toy world (skipped when OUT/base exists)")
    pretrain_batch: int = arg(64, "pretraining sequences per step")
    pretrain_lr: float = arg(3e-3, "pretraining peak learning rate")
    block_share: float = arg(0.3, "share of pretraining items that are 'target + 4 nearby solved problems' blocks")
    # the method: steps 1-3
    m: int = arg(8, "synthetic examples per target (step 1)")
    temperature: float = arg(1.0, "sampling temperature of the generator")
    max_new: int = arg(24, "most tokens per generated example")
    answer_with: str = arg("sample", "answers to train on: sample (as generated) | greedy (the base re-answers p_i)")
    K: int = arg(8, "inner SGD steps (step 3)")
    alpha: float = arg(0.2, "inner learning rate")
    inner_clip: float = arg(0.5, "clip each inner step's gradient norm to this, a guard against wrecking updates (0: off)")
    lora_rank: int = arg(4, "rank of the inner adapter phi and the generator adapter psi")
    lora_alpha: float = arg(4.0, "LoRA scale numerator: the update is (lora_alpha / lora_rank) B A")
    lora_modules: str = arg("auto", "comma-separated names of the linear layers that get adapters; auto: by family "
                                    "(q_proj,v_proj | c_attn | query_key_value)")
    meta_grad: str = arg("unroll", "meta-gradient mode: unroll (keep all K steps' graph) | replay (one step's)")
    # meta-training: eqs. 3-5
    meta_steps: int = arg(150, "meta-training steps (each one Adam step of eta and psi)")
    meta_batch: int = arg(8, "targets per meta-step")
    eta_lr: float = arg(0.01, "Adam learning rate of the scorer eta")
    psi_lr: float = arg(1e-4, "Adam learning rate of the generator adapter psi (REINFORCE)")
    improvement_coef: float = arg(1.0, "weight of the post-update improvement in the generator's reward")
    reward_norm: str = arg("target", "divide each target's dL_out/dw, for the generator's reward, by: target (its "
                           "own norm) | running (a running typical norm, capping one target at 3x typical)")
    eta_grad_norm: str = arg("target", "divide each target's dL_out/dw by: target (its own norm) | running (a "
                             "running typical norm, capping one target at 3x typical)")
    scorer_width: int = arg(32, "hidden width of the scorer")
    log_every: int = arg(10, "meta-steps between summary lines")
    # evaluation
    eval_targets: int = arg(300, "held-out targets, balanced over the domains")
    # reliability (README: Reliability)
    checkpoint_every: int = arg(10, "meta-steps between checkpoints (also written at the end, on Ctrl-C and at a stop)")
    max_skip_share: float = arg(0.5, "stop when more than this share of the meta-steps so far skipped their update "
                                     "(checked at each summary line; 1: never)")

    @property
    def lora_scale(self):
        return self.lora_alpha / self.lora_rank

    @property
    def natural(self):
        """Real problems in natural language, answered with worked solutions (else the toy world's one-liners)."""
        return bool(self.data or self.eval_data)


PRESETS = {
    "default": {},
    "tiny": dict(hidden=48, layers=2, heads=2, intermediate=96, pretrain_steps=300, pretrain_batch=16, m=4, K=2,
                 max_new=16, meta_steps=4, meta_batch=2, log_every=2, eval_targets=12),
    "full": dict(pretrain_steps=6000, meta_steps=400, eval_targets=600),
}


# ----------------------------------------------------------------------------- options, checked before any work

AT_LEAST_1 = ["m", "K", "max_new", "max_len", "lora_rank", "meta_batch", "log_every", "eval_targets", "checkpoint_every",
              "hidden", "layers", "heads", "intermediate", "pretrain_steps", "pretrain_batch", "scorer_width"]
AT_LEAST_0 = ["meta_steps", "limit", "temperature", "inner_clip", "improvement_coef"]
ABOVE_0 = ["alpha", "eta_lr", "psi_lr", "pretrain_lr", "lora_alpha"]
SHARES = ["block_share", "max_skip_share"]      # from 0 to 1
CHOICES = {"dtype": base_model.DTYPES, "outer_target": ("solution", "answer"), "meta_grad": ("unroll", "replay"),
           "eta_grad_norm": ("target", "running"), "reward_norm": ("target", "running"),
           "answer_with": ("sample", "greedy")}


class Parser(argparse.ArgumentParser):
    def error(self, message):   # one line that names the option, exit status 2 (argparse would print the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n")


def flag(name):
    return f"--{name.replace('_', '-')}"


def option_error(cfg):
    """What is wrong with the settings, in one line naming the option; None when nothing is."""
    for name, allowed in CHOICES.items():
        if getattr(cfg, name) not in allowed:
            return f"{flag(name)} must be one of {', '.join(allowed)}, not {getattr(cfg, name)!r}"
    for names, ok, what in ((AT_LEAST_1, lambda v: v >= 1, "at least 1"), (AT_LEAST_0, lambda v: v >= 0, "at least 0"),
                            (ABOVE_0, lambda v: v > 0, "above 0"), (SHARES, lambda v: 0 <= v <= 1, "from 0 to 1")):
        for name in names:
            value = getattr(cfg, name)
            if not (math.isfinite(value) and ok(value)):
                return f"{flag(name)} must be {what}, not {value}"
    device = base_model.pick_device(cfg.device)
    if device.split(":")[0] not in ("cpu", "cuda", "mps") or (device.startswith("cuda") and not torch.cuda.is_available()):
        return f"--device {cfg.device}: not cpu, auto or an available cuda device"
    if not cfg.model and cfg.hidden % cfg.heads:
        return f"--hidden {cfg.hidden} must be a multiple of --heads {cfg.heads}"
    if not cfg.model and cfg.lora_rank > min(cfg.hidden, cfg.intermediate):   # a --model's layers: check_inputs
        return f"--lora-rank {cfg.lora_rank} is larger than the toy model's layers ({cfg.hidden} wide)"
    if cfg.eval_data and not cfg.data and cfg.meta_steps > 0:
        return "--eval-data needs --data to meta-train on (or --meta-steps 0)"
    return None


def parse_args(argv=None):
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    aliases = {"lora_modules": ["--lora-targets"]}
    for f in dataclasses.fields(Config):
        parser.add_argument(flag(f.name), *aliases.get(f.name, []), dest=f.name,
                            type=type(f.default), default=None, help=f"{f.metadata['help']} (default: {f.default})")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", "default")
    if preset not in PRESETS:
        parser.error(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    cfg = Config(**{**PRESETS[preset], **given})
    error = option_error(cfg)
    if error:
        parser.error(error)
    return cfg


# ----------------------------------------------------------------------------- files, checked before any work

def check_model(folder, cfg):
    """A --model (or a cached OUT/base) must be a local Hugging Face causal LM whose layers take the adapters: checked
    on its config alone, with the model built on the meta device (no weights read)."""
    if not os.path.isdir(folder):
        raise ValueError(f"--model {folder}: no such folder")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"--model {folder}: not a Hugging Face model folder (no config.json)")
    config = AutoConfig.from_pretrained(folder)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"--model {folder}: model type {config.model_type!r} is not a causal LM")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    init_lora(model, lora_targets(model, cfg.lora_modules), cfg.lora_rank)   # raises: no such layers, rank too large


def check_inputs(cfg):
    """Everything that can be refused before any work starts; raises ValueError (or OSError) whose message names the
    file and line, or the option. Only reads: nothing is created or changed. Returns the --data rows and the checkpoint
    to continue from (None when there is none)."""
    checkpoint.check_writable(cfg.out)
    rows = tasks.load_jsonl(cfg.data) if cfg.data else None
    if cfg.eval_data:
        tasks.load_jsonl(cfg.eval_data)
    base = os.path.join(cfg.out, "base")
    if cfg.model or os.path.exists(os.path.join(base, "config.json")):
        check_model(cfg.model or base, cfg)
    return rows, checkpoint.read(cfg.out, dataclasses.asdict(cfg))


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
                        block_share=cfg.block_share, seed=cfg.seed, device=cfg.device)
    for unfinished in (folder + ".tmp", folder):      # left by a kill mid-save (folder: no config.json in it)
        shutil.rmtree(unfinished, ignore_errors=True)
    base_model.save(model, tok, folder + ".tmp")
    os.replace(folder + ".tmp", folder)
    return base_model.load(folder, cfg.device, cfg.dtype)


# ----------------------------------------------------------------------------- the run

def main(cfg, ready=None):
    """ready: what check_inputs(cfg) returned (checked here when not given)."""
    data_rows, saved = ready or check_inputs(cfg)
    cfg.device = base_model.pick_device(cfg.device)
    rank, world, cfg.device = data_parallel.start(cfg.device)   # torchrun: this process's rank, of world; alone 0, 1
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        settings = json.dumps(dataclasses.asdict(cfg), indent=1)
        checkpoint.atomic_write(os.path.join(cfg.out, "config.json"), lambda f: f.write(settings.encode()))
    if rank == 0 or cfg.model:
        model, tok = base_model.load(cfg.model, cfg.device, cfg.dtype) if cfg.model else load_or_pretrain_base(cfg)
    if world > 1:                    # torchrun: the other ranks wait for the base rank 0 pretrained, then load it
        dist.barrier()
        if rank > 0 and not cfg.model:
            model, tok = base_model.load(os.path.join(cfg.out, "base"), cfg.device, cfg.dtype)

    # ---- the learned parts: scorer eta, generator adapter psi; phi_0, the inner adapter's fixed start
    targets = lora_targets(model, cfg.lora_modules)
    torch.manual_seed(cfg.seed)      # eta's initial weights: the same whether the base was pretrained now or loaded
    eta = Scorer(model.config.hidden_size, cfg.scorer_width).to(cfg.device)
    psi = {n: p.requires_grad_() for n, p in init_lora(model, targets, cfg.lora_rank, seed=cfg.seed).items()}
    phi0 = init_lora(model, targets, cfg.lora_rank, seed=cfg.seed + 1)
    eta_opt = torch.optim.Adam(eta.parameters(), lr=cfg.eta_lr)
    psi_opt = torch.optim.Adam(psi.values(), lr=cfg.psi_lr)

    # ---- meta-training state; continued from OUT/checkpoint.pt when there is one
    rng = random.Random(cfg.seed)    # the stream of meta-training targets draws from it alone
    running = {"improvement": 0.0,   # running mean of L_before - L_after, the baseline of the improvement reward
               "g_norm": None}       # running mean of |dL_out/dw|, the typical scale of the attribution
    window = {"rows": [], "seconds": [], "skipped_steps": 0}   # what the next summary line averages and counts
    done, skipped_steps = 0, 0       # meta-steps done, and how many of them skipped their update
    if saved:
        eta.load_state_dict(saved["eta"])
        with torch.no_grad():
            for n, p in psi.items():
                p.copy_(saved["psi"][n])
        eta_opt.load_state_dict(saved["eta_opt"])
        psi_opt.load_state_dict(saved["psi_opt"])
        running.update(saved["running"])
        done, skipped_steps, window = saved["step"], saved["skipped_steps"], saved["window"]
        checkpoint.restore_rng_states(saved["rng"], rng)
        if rank == 0:
            print(f"continuing from the checkpoint at meta-step {done} in {cfg.out}")

    def save_checkpoint(step):   # eta.pt, psi.pt, phi0.pt (what evaluate.py --out reads), then the checkpoint
        if rank > 0:             # torchrun: rank 0 writes, for every rank (they hold the same eta and psi)
            return
        psi_cpu = {n: p.detach().cpu() for n, p in psi.items()}
        for name, obj in (("eta", eta.state_dict()), ("psi", psi_cpu), ("phi0", phi0)):
            checkpoint.save(os.path.join(cfg.out, f"{name}.pt"), obj)
        checkpoint.save(os.path.join(cfg.out, "checkpoint.pt"), {
            "step": step, "config": dataclasses.asdict(cfg), "eta": eta.state_dict(), "psi": psi_cpu,
            "eta_opt": eta_opt.state_dict(), "psi_opt": psi_opt.state_dict(), "running": dict(running),
            "window": window, "skipped_steps": skipped_steps, "rng": checkpoint.rng_states(rng)})

    # ---- meta-training: each step, a meta-batch of targets; one Adam step of eta and psi
    if cfg.data:
        stream = tasks.row_targets(data_rows, rng, cfg.outer_target)
    else:
        stream = tasks.train_targets(rng)
    log_path = os.path.join(cfg.out, "metrics.jsonl")
    if rank == 0:
        checkpoint.keep_logged_lines(log_path, done)
    log = open(log_path if rank == 0 else os.devnull, "a")   # torchrun: rank 0 logs
    stop = checkpoint.stop_signals()
    params = [*eta.parameters(), *psi.values()]
    bar = tqdm(range(done + 1, cfg.meta_steps + 1), initial=done, total=cfg.meta_steps, desc="meta-training",
               unit="step", disable=rank > 0)
    for step in bar:
        start = time.time()
        rows = []
        if world > 1:                # torchrun: a row per target for its gradient
            per_target = torch.zeros(cfg.meta_batch, sum(p.numel() for p in params), device=cfg.device)
        for i in range(cfg.meta_batch):
            _, target, reference = next(stream)
            if i % world != rank:    # torchrun: each rank takes every world-th target of the meta-batch
                continue
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + (step - 1) * cfg.meta_batch + i)
            rows.append(meta_step(model, tok, eta, psi, phi0, target, reference, cfg, gen,
                                  running, grad_scale=1 / cfg.meta_batch))
            if world > 1:            # torchrun: this target's gradient, kept apart for the sum in target order
                per_target[i] = data_parallel.take_grads(params)
        stopping = list(stop)        # a signal arriving from here on is seen after the next step
        if world > 1:                # torchrun: one all-reduce of the gradients; every target's rows on every rank
            data_parallel.sum_grads(per_target, params)
            gathered = data_parallel.gather((rows, stopping))
            rows = data_parallel.in_order([r for r, _ in gathered], cfg.meta_batch)
            stopping = [s for _, signals in gathered for s in signals][:1]
        # an update only when some target parsed and every loss and gradient is finite; else eta and psi stay
        learned = [r for r in rows if not r["skipped"]]
        grads = [p.grad for p in params if p.grad is not None]
        finite = all(math.isfinite(r[k]) for r in learned for k in ("L_before", "L_after", "surrogate", "g_norm"))
        update = bool(learned) and finite and all(torch.isfinite(g).all() for g in grads)
        if update:
            for r in learned:  # the running means move once per step, so every target of a step sees the same ones
                running["improvement"] = ema(running["improvement"], r["improvement"])
                running["g_norm"] = ema(running["g_norm"], r["g_norm"])
            eta_opt.step()
            psi_opt.step()
        else:
            skipped_steps += 1
            window["skipped_steps"] += 1
        eta_opt.zero_grad(set_to_none=True)
        psi_opt.zero_grad(set_to_none=True)
        window["rows"] += rows if update else [r for r in rows if r["skipped"]]   # a skipped step's losses: no means
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
            window = {"rows": [], "seconds": [], "skipped_steps": 0}
            too_many = skipped_steps > cfg.max_skip_share * step
        if step % cfg.checkpoint_every == 0 or too_many or stopping:
            save_checkpoint(step)
        if too_many or stopping:
            log.close()
            checkpoint.default_signals()
        if too_many:
            sys.exit(f"stopped at meta-step {step}: {skipped_steps} meta-steps skipped their update (no target parsed, "
                     f"or a non-finite loss or gradient), more than --max-skip-share {cfg.max_skip_share} of them; "
                     f"see {log_path}; the checkpoint in {cfg.out} continues the run" if rank == 0 else 1)
        if stopping:
            if rank == 0:
                print(f"stopped at meta-step {step}: the same command continues from the checkpoint", file=sys.stderr)
            sys.exit(128 + stopping[0])
    checkpoint.default_signals()
    log.close()
    save_checkpoint(cfg.meta_steps)
    if rank == 0:
        print(f"saved eta, psi and phi_0 in {cfg.out}; meta-training log in {log_path}")

    # ---- held-out evaluation of every method (torchrun: each rank takes every world-th target; rank 0 writes)
    evaluate.run(model, tok, eta, {n: p.detach() for n, p in psi.items()}, phi0, cfg, cfg.out, rank=rank, world=world)
    if world > 1:
        dist.destroy_process_group()


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
    cfg = parse_args(argv)
    try:
        ready = check_inputs(cfg)
    except (ValueError, OSError) as e:
        print(f"train.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
    main(cfg, ready)


if __name__ == "__main__":
    cli(sys.argv[1:])
