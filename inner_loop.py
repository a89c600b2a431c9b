"""
Step 3 of MASS: the weighted SFT self-update, K unrolled SGD steps on a LoRA adapter phi.

LoRA is written by hand: an adapter is a dict of tensors {"<module>.A": (r, in), "<module>.B": (out, r)}, and
the adapted weight W + (lora_alpha / r) * B @ A is injected with `torch.func.functional_call`, so the base
model is never modified and gradients flow to phi (and, in the meta-step, through phi to the weights w).

    eq. 1  L_in(phi; w) = (1/m) sum_i w_i * l_i(theta + phi),   l_i = NLL of answer a_i given problem p_i
    eq. 2  phi_{k+1}    = phi_k - alpha * grad_phi L_in(phi_k; w),   k = 0 .. K-1

    python -m pytest test_mass.py -k lora    # the tests that check this file
"""
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

# ----------------------------------------------------------------------------- functional LoRA

# Where adapters go in the common families, tried in this order by lora_targets(model, "auto").
FAMILIES = [("q_proj", "v_proj"),      # Llama, Mistral, Qwen2, Gemma (nn.Linear)
            ("c_attn",),               # GPT-2: q, k, v in one transformers Conv1D
            ("query_key_value",)]      # GPT-NeoX, Pythia, Falcon: q, k, v in one nn.Linear


def lora_targets(model, names="auto"):
    """Names of the linear layers that get an adapter (never the embeddings: they are tied).
    names: "auto" (the first of FAMILIES found in the model), or module names as a list or comma-separated string."""
    tried = FAMILIES if names == "auto" else [names.split(",") if isinstance(names, str) else names]
    for family in tried:
        found = [n for n, mod in model.named_modules()
                 if n.split(".")[-1] in family and isinstance(mod, (torch.nn.Linear, Conv1D))]
        if found:
            return found
    raise ValueError(f"no nn.Linear or Conv1D module named any of {[n for f in tried for n in f]} in "
                     f"{type(model).__name__}; name its attention projections with --lora-modules")


def out_in(module):
    """(out, in) of a layer: nn.Linear stores its weight as (out, in), transformers' Conv1D (GPT-2) as (in, out)."""
    W = module.weight
    return (W.shape[1], W.shape[0]) if isinstance(module, Conv1D) else tuple(W.shape)


def init_lora(model, targets, rank, seed=0):
    """A fresh adapter: A random (Kaiming-uniform, as in the LoRA paper), B = 0, so it starts as a no-op.
    Adapters are float32 (float64 for a float64 model) even when the model is bfloat16."""
    gen = torch.Generator().manual_seed(seed)
    adapter = {}
    for name in targets:
        module = model.get_submodule(name)
        (n_out, n_in), W = out_in(module), module.weight
        dtype = torch.promote_types(W.dtype, torch.float32)
        if rank > min(n_out, n_in):
            raise ValueError(f"LoRA rank {rank} is larger than layer {name} of shape {tuple(W.shape)}")
        bound = 1 / math.sqrt(n_in)
        A = (torch.rand(rank, n_in, generator=gen) * 2 - 1) * bound
        adapter[f"{name}.A"] = A.to(W.device, dtype)                               # (r, in)
        adapter[f"{name}.B"] = torch.zeros(n_out, rank, device=W.device, dtype=dtype)  # (out, r)
    return adapter


def merged_weights(model, adapters, scale):
    """{"<module>.weight": W + scale * sum over adapters of B @ A}: the parameters functional_call overrides.
    For a Conv1D, whose weight is (in, out), the update is added transposed: W + scale * (B @ A)^T."""
    merged = {}
    for adapter in adapters:
        for key in adapter:
            if key.endswith(".A"):
                name = key[:-2]
                module = model.get_submodule(name)
                W = merged.get(f"{name}.weight", module.weight)
                delta = scale * adapter[f"{name}.B"] @ adapter[f"{name}.A"]          # (out, in)
                if isinstance(module, Conv1D):
                    delta = delta.T                                                  # (in, out)
                merged[f"{name}.weight"] = W + delta.to(W.dtype)
    return merged


def forward(model, adapters, scale, ids, **kwargs):
    """Logits of the base model with the adapters applied, without touching the model's own weights."""
    return functional_call(model, merged_weights(model, adapters, scale), (ids,), {"use_cache": False, **kwargs}).logits


# ----------------------------------------------------------------------------- the SFT data and its loss

def encode(tok, prompts, answers, device="cpu", max_len=None):
    """A right-padded batch: ids (n, L) and a mask (n, L) that is 1 on the answer tokens only.
    A row longer than max_len tokens loses its tail (None: no limit)."""
    rows, masks = [], []
    for prompt, answer in zip(prompts, answers):
        p = tok(prompt)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        rows.append((p + a)[:max_len])
        masks.append(([0] * len(p) + [1] * len(a))[:max_len])
    L = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (L - len(r)) for r in rows], device=device)
    mask = torch.tensor([m + [0] * (L - len(m)) for m in masks], device=device, dtype=torch.float32)
    return {"ids": ids, "mask": mask}


def answer_nll(model, adapters, scale, batch):
    """l_i: the summed NLL of each row's answer tokens, shape (n,). Right padding needs no attention mask."""
    logits = forward(model, adapters, scale, batch["ids"])                     # (n, L, V)
    logp = F.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), -1)  # (n, L-1, V)
    token_logp = logp.gather(-1, batch["ids"][:, 1:, None]).squeeze(-1)        # (n, L-1)
    return -(token_logp * batch["mask"][:, 1:]).sum(1)                         # (n,)


def inner_loss(model, phi, scale, batch, weights):
    return (weights * answer_nll(model, [phi], scale, batch)).mean()           # eq. 1


# ----------------------------------------------------------------------------- the unrolled inner loop

def clip_by_norm(grads, max_norm):
    """The guard against a wrecking update: scale the step down to norm max_norm (differentiable; None: off)."""
    if max_norm is None:
        return grads
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    return [g * torch.clamp(max_norm / (norm + 1e-12), max=1.0) for g in grads]


def adapt(model, phi0, scale, batch, weights, alpha, K, create_graph=False, max_norm=None):
    """phi_0 .. phi_K of eq. 2. With create_graph=True every step stays differentiable (the `unroll` mode):
    phi_K is a function of the weights w through all K steps. Otherwise each phi_k is a fresh leaf.
    max_norm clips each step's gradient norm (None: plain SGD, as in eq. 2)."""
    phis = [phi0]
    for k in range(K):
        phi = phis[-1]
        if k == 0 or not create_graph:  # a leaf to differentiate with respect to
            phi = {n: p.detach().requires_grad_() for n, p in phi.items()}
        loss = inner_loss(model, phi, scale, batch, weights)
        grads = clip_by_norm(torch.autograd.grad(loss, list(phi.values()), create_graph=create_graph), max_norm)
        phis.append({n: p - alpha * g for (n, p), g in zip(phi.items(), grads)})  # eq. 2
        if not create_graph:
            phis[-1] = {n: p.detach() for n, p in phis[-1].items()}
    return phis
