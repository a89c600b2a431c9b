"""
MASS end to end: build and pretrain the base model, meta-train the scorer eta and the generator adapter psi,
then evaluate test-time adaptation on held-out targets.

    python train.py                  # the embedded demo: everything under runs/default
    python train.py --preset tiny    # the same path on a tiny configuration, in seconds
    python train.py --model DIR --data math_train.jsonl --eval-data math500_test.jsonl   # a real LM (README)
    python train.py --help           # every setting
"""
import argparse
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

import base_model
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
    K: int = arg(4, "inner SGD steps (step 3)")
    alpha: float = arg(0.03, "inner learning rate")
    inner_clip: float = arg(0.0, "clip each inner step's gradient norm to this, a guard against wrecking updates (0: off)")
    lora_rank: int = arg(4, "rank of the inner adapter phi and the generator adapter psi")
    lora_alpha: float = arg(4.0, "LoRA scale numerator: the update is (lora_alpha / lora_rank) B A")
    lora_modules: str = arg("auto", "comma-separated names of the linear layers that get adapters; auto: by family "
                                    "(q_proj,v_proj | c_attn | query_key_value)")
    meta_grad: str = arg("unroll", "meta-gradient mode: unroll (keep all K steps' graph) | replay (one step's)")
    # meta-training: eqs. 3-5
    meta_steps: int = arg(150, "meta-training steps (each one Adam step of eta and psi)")
    meta_batch: int = arg(8, "targets per meta-step")
    eta_lr: float = arg(0.03, "Adam learning rate of the scorer eta")
    psi_lr: float = arg(1e-3, "Adam learning rate of the generator adapter psi (REINFORCE)")
    improvement_coef: float = arg(1.0, "weight of the post-update improvement in the generator's reward")
    eta_grad_norm: str = arg("target", "divide each target's dL_out/dw by: target (its own norm) | running (a "
                             "running typical norm, capping one target at 3x typical)")
    scorer_width: int = arg(32, "hidden width of the scorer")
    log_every: int = arg(10, "meta-steps between summary lines")
    # evaluation
    eval_targets: int = arg(300, "held-out targets, balanced over the domains")

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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    aliases = {"lora_modules": ["--lora-targets"]}
    for f in dataclasses.fields(Config):
        parser.add_argument(f"--{f.name.replace('_', '-')}", *aliases.get(f.name, []), dest=f.name,
                            type=type(f.default), default=None, help=f"{f.metadata['help']} (default: {f.default})")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    preset = given.get("preset", "default")
    if preset not in PRESETS:
        parser.error(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    cfg = Config(**{**PRESETS[preset], **given})
    for name, allowed in (("dtype", base_model.DTYPES), ("outer_target", ("solution", "answer"))):
        if getattr(cfg, name) not in allowed:
            parser.error(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, not {getattr(cfg, name)!r}")
    if cfg.eval_data and not cfg.data and cfg.meta_steps > 0:
        parser.error("--eval-data needs --data to meta-train on (or --meta-steps 0)")
    return cfg


def load_or_pretrain_base(cfg):
    """The base model, pretrained once and cached in OUT/base; a second run reuses it."""
    folder = os.path.join(cfg.out, "base")
    if os.path.exists(os.path.join(folder, "config.json")):
        print(f"reusing the pretrained base model in {folder}")
        return base_model.load(folder, cfg.device, cfg.dtype)
    tok = base_model.build_tokenizer()
    model = base_model.build_model(len(tok), cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate, seed=cfg.seed)
    base_model.pretrain(model.to(cfg.device), tok, cfg.pretrain_steps, cfg.pretrain_batch, lr=cfg.pretrain_lr,
                        block_share=cfg.block_share, seed=cfg.seed, device=cfg.device)
    base_model.save(model, tok, folder)
    return base_model.load(folder, cfg.device, cfg.dtype)


def main(cfg):
    cfg.device = base_model.pick_device(cfg.device)
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    torch.manual_seed(cfg.seed)
    model, tok = base_model.load(cfg.model, cfg.device, cfg.dtype) if cfg.model else load_or_pretrain_base(cfg)

    # ---- the learned parts: scorer eta, generator adapter psi; phi_0, the inner adapter's fixed start
    targets = lora_targets(model, cfg.lora_modules)
    eta = Scorer(model.config.hidden_size, cfg.scorer_width).to(cfg.device)
    psi = {n: p.requires_grad_() for n, p in init_lora(model, targets, cfg.lora_rank, seed=cfg.seed).items()}
    phi0 = init_lora(model, targets, cfg.lora_rank, seed=cfg.seed + 1)
    eta_opt = torch.optim.Adam(eta.parameters(), lr=cfg.eta_lr)
    psi_opt = torch.optim.Adam(psi.values(), lr=cfg.psi_lr)

    # ---- meta-training: each step, a meta-batch of targets; one Adam step of eta and psi
    rng = random.Random(cfg.seed)
    if cfg.data:
        stream = tasks.row_targets(tasks.load_jsonl(cfg.data), rng, cfg.outer_target)
    else:
        stream = tasks.train_targets(rng)
    running = {"improvement": 0.0,   # running mean of L_before - L_after, the baseline of the improvement reward
               "g_norm": None}       # running mean of |dL_out/dw|, the typical scale of the attribution
    log_path = os.path.join(cfg.out, "metrics.jsonl")
    log = open(log_path, "w")
    window, seconds = [], []
    bar = tqdm(range(1, cfg.meta_steps + 1), desc="meta-training", unit="step")
    for step in bar:
        start = time.time()
        rows = []
        for i in range(cfg.meta_batch):
            _, target, reference = next(stream)
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + (step - 1) * cfg.meta_batch + i)
            rows.append(meta_step(model, tok, eta, psi, phi0, target, reference, cfg, gen,
                                  running, grad_scale=1 / cfg.meta_batch))
        for r in rows:  # the running means move once per step, so every target of a step sees the same ones
            if not r["skipped"]:
                running["improvement"] = ema(running["improvement"], r["improvement"])
                running["g_norm"] = ema(running["g_norm"], r["g_norm"])
        window += rows
        eta_opt.step()
        psi_opt.step()
        eta_opt.zero_grad(set_to_none=True)
        psi_opt.zero_grad(set_to_none=True)
        seconds.append(time.time() - start)
        if step % cfg.log_every == 0 or step == cfg.meta_steps:
            row = {"step": step, "targets": step * cfg.meta_batch, **summarize(window),
                   "sec_per_step": sum(seconds) / len(seconds)}
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.write(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
            window, seconds = [], []
    log.close()
    torch.save(eta.state_dict(), os.path.join(cfg.out, "eta.pt"))
    torch.save({n: p.detach().cpu() for n, p in psi.items()}, os.path.join(cfg.out, "psi.pt"))
    torch.save(phi0, os.path.join(cfg.out, "phi0.pt"))
    print(f"saved eta, psi and phi_0 in {cfg.out}; meta-training log in {log_path}")

    # ---- held-out evaluation of every method
    evaluate.run(model, tok, eta, {n: p.detach() for n, p in psi.items()}, phi0, cfg, cfg.out)


def ema(mean, x, rate=0.05):
    return x if mean is None else mean + rate * (x - mean)


def summarize(window):
    """Means over the targets since the last summary line (nan-aware), and the count of skipped targets."""
    done = [r for r in window if not r["skipped"]]
    keys = [k for k in (done[0] if done else {}) if k != "skipped"]
    mean = lambda k: float(torch.tensor([r[k] for r in done], dtype=torch.float64).nanmean())
    return {**{k: mean(k) for k in keys}, "skipped": sum(r["skipped"] for r in window)}


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
