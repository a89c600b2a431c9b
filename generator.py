"""
Step 1 of MASS: self-synthesis. The model, prompted with a target problem T, writes m practice examples.

The generator is theta = base + psi: the frozen base with a trainable LoRA adapter psi (B = 0 at the start, so
the untrained generator is the base model itself). psi is trained by REINFORCE in meta_step.py, which needs
log pi_psi(p_i, a_i | T) with gradient; sampling itself runs without gradient.

Sampling is a short loop of our own through `functional_call`, because `model.generate` cannot take the adapter
as a parameter override: the adapters are merged into the weights once per call, the prompt runs once, and each new
token runs alone against a KV cache (transformers' DynamicCache), as `generate` does.

What the prompt says, what ends a sample and how a sample becomes a practice example (p_i, a_i) belong to the world
(world.py): a toy worked problem `42+23+18=65+18=83`, or a worked real problem `Problem: ... Solution: ... \\boxed{5}`.

    python generator.py RUN_DIR [N]   # practice problems of a train.py run's untrained and trained generator,
                                      # for its first N held-out targets (default runs/default, 5)
"""
import contextlib
import inspect
import os
import sys

import torch
import torch.nn.functional as F
from torch.func import functional_call
from transformers import DynamicCache
from transformers.pytorch_utils import Conv1D

from inner_loop import answer_nll, encode, merged_weights


def cache_argument(model):
    """The name of the model's KV-cache argument: `cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def eos_ids(model, tok):
    """The token ids that end a text: the tokenizer's EOS and the model's (Llama 3 Instruct has several)."""
    config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config_ids = config_ids if isinstance(config_ids, list) else [config_ids]
    return {i for i in [tok.eos_token_id, *config_ids] if i is not None}


@contextlib.contextmanager
def adapter_per_row(model, adapters, scale):
    """Inside it, row r of every batch runs through base + adapters[r]: each adapted layer computes row r alone with
    its own merged weight (merged_weights of that one adapter), as a call with that adapter alone would. One forward
    then serves several adapters (evaluate.py: every method's answer to T in one batch)."""
    per_row = [merged_weights(model, [adapter], scale) for adapter in adapters]
    handles = []
    for key in sorted({k for weights in per_row for k in weights}):
        module = model.get_submodule(key.removesuffix(".weight"))
        row_weights = [weights.get(key, module.weight) for weights in per_row]

        def layer(mod, inputs, output, row_weights=row_weights):   # replaces the layer's output, row by row
            x = inputs[0]
            return torch.cat([linear(mod, x[r:r + 1], W) for r, W in enumerate(row_weights)])
        handles.append(module.register_forward_hook(layer))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def linear(module, x, W):
    """What the module computes with weight W: nn.Linear, or transformers' Conv1D (GPT-2), whose W is (in, out)."""
    if isinstance(module, Conv1D):
        return torch.addmm(module.bias, x.view(-1, x.size(-1)), W).view(*x.shape[:-1], W.shape[1])
    return F.linear(x, W, module.bias)


@torch.no_grad()
def decode(model, adapters, scale, tok, prompts, max_new, temperature=0.0, gen=None, stop="\n", use_cache=True,
           per_row=None):
    """Continue each prompt until `stop` (None: EOS only) or EOS, at most max_new tokens; greedy when temperature is 0.
    Prompts of different lengths are left-padded, with an attention mask and matching position ids.
    use_cache: run the prompt once, then one new token per step against the cached keys and values (a DynamicCache);
    False: the whole sequence again for every token (the plain reference; the same text, see test_real.py).
    per_row: instead of `adapters` for every row, one adapter per prompt (adapter_per_row)."""
    encoded = [tok(p)["input_ids"] for p in prompts]
    L = max(map(len, encoded))
    device = model.device
    ids = torch.tensor([[tok.pad_token_id] * (L - len(e)) + e for e in encoded], device=device)    # (n, L)
    attention = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in encoded], device=device)  # (n, L)
    weights = merged_weights(model, adapters, scale)      # W + scale * B A, once for the whole call
    cache = DynamicCache(config=model.config) if use_cache else None
    one_prompt = use_cache and len(set(prompts)) == 1 and not per_row   # m samples of one prompt: run it once
    unseen = ids[:1] if one_prompt else ids               # the tokens whose keys and values are not cached yet
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    eos = eos_ids(model, tok)
    with adapter_per_row(model, per_row or [], scale):   # no hooks without per_row
        for _ in range(max_new):
            if not use_cache:
                unseen = ids
            rows = len(unseen)
            positions = (attention[:rows].cumsum(1) - 1).clamp(min=0)[:, -unseen.shape[1]:]  # real tokens before
            logits = functional_call(model, weights, (unseen,), {"attention_mask": attention[:rows], "position_ids":
                                     positions, cache_argument(model): cache, "use_cache": use_cache}).logits[:, -1]
            if rows < len(prompts):                       # the one prompt's keys, values and logits, for every sample
                cache.batch_repeat_interleave(len(prompts))
                logits = logits.expand(len(prompts), -1)                                     # (n, V)
            if temperature > 0:  # sample on the CPU so that a seeded generator gives the same text on any device
                probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)            # (n, V)
                next_ids = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(device)   # (n,)
            else:
                next_ids = logits.argmax(-1)                                                   # (n,)
            unseen = next_ids[:, None]                                                         # (n, 1)
            ids = torch.cat([ids, unseen], 1)                                                  # (n, L + t)
            attention = torch.cat([attention, torch.ones_like(unseen)], 1)                    # (n, L + t)
            for i, t in enumerate(next_ids.tolist()):
                if not done[i]:
                    out[i].append(t)
                    done[i] = t in eos or (stop is not None and stop in tok.decode(out[i]))
            if all(done):
                break
    texts = [tok.decode(o, skip_special_tokens=True) for o in out]
    return texts if stop is None else [t.split(stop)[0] for t in texts]


def synthesize(model, psi, scale, tok, world, target, m, temperature, max_new, gen):
    """Step 1: m sampled texts for target T, each parsed by the world into a practice example (p_i, a_i) or found
    invalid. Each valid example also gets the base model's greedy answer to its problem (`greedy`), used as a
    self-consistency feature and optionally as its answer."""
    prompts = [world.practice_prompt(tok, target)] * m
    lines = decode(model, [psi], scale, tok, prompts, max_new, temperature, gen, world.stop)
    parsed = [world.parse(line) for line in lines]
    valid = [p for p in parsed if p is not None]
    prompts = [world.answer_prompt(tok, p) for p, _ in valid]
    greedy = iter(decode(model, [], scale, tok, prompts, max_new, stop=world.stop) if valid else [])
    return [{"line": line, "valid": p is not None, "problem": p and p[0], "answer": p and p[1],
             "greedy": p and next(greedy)} for line, p in zip(lines, parsed)]


def log_prob(model, psi, scale, tok, world, target, lines):
    """log pi_psi(line_i + its end | prompt(T)) for each line, shape (m,), differentiable in psi."""
    end = world.answer_end(tok)
    batch = encode(tok, [world.practice_prompt(tok, target)] * len(lines), [line + end for line in lines],
                   model.device)
    return -answer_nll(model, [psi], scale, batch)


def mark(world, target, e):
    """A sample as the world sees it: 'x' unparsed (or wrong, by the toy world's checker); with a checker, its
    relation to T (same: another problem with T's answer); without one, 'valid' (or 'target': T itself)."""
    if not e["valid"] or (world.has_checker and world.solve(e["problem"]) != e["answer"]):
        return "x"
    if not world.has_checker:
        return "target" if e["problem"] == target else "valid"
    return world.relation(e["problem"], target)


if __name__ == "__main__":
    import base_model
    import config
    args = sys.argv[1:]
    run = args[0] if args else "runs/default"
    try:   # a missing or unusable run: one line, no traceback
        n = int(args[1]) if len(args) > 1 else 5
        cfg = config.of_run(run)
        cfg.eval_targets, cfg.limit = n, n                    # the first n held-out targets
        base = cfg.model or os.path.join(run, "base")
        base_model.check(base, cfg.lora_modules, cfg.lora_rank, option="RUN_DIR" if not cfg.model else "--model")
        psi_path = os.path.join(run, "psi.pt")
        psi = torch.load(psi_path, weights_only=True) if os.path.exists(psi_path) else None
        world = config.make_world(cfg)
    except Exception as e:
        config.refuse("generator.py", e)
    model, tok = base_model.load(base)
    print("six samples for each held-out target, marked " + (
        "by the checker: same (right, T's answer), other (right), target (T itself, right), x (wrong)"
        if world.has_checker else "valid (parsed), target (T itself), x (not parsed)") + "\n" +
        ("untrained generator (the base), then the trained one (base + psi)" if psi is not None
         else "the untrained generator (no psi.pt)"))
    for domain, problem, _, answer in world.heldout():
        print(f"\n{problem}{answer}" if world.has_checker else f"\nT: {problem}\n   (answer {answer})")
        for name, adapter in (("base", {}), ("trained", psi)):
            if adapter is None:
                continue
            examples = synthesize(model, adapter, cfg.lora_scale, tok, world, problem, 6, cfg.temperature,
                                  cfg.max_new, torch.Generator().manual_seed(0))
            if world.has_checker:   # one line each
                print(f"  {name:8s}" + "  ".join(f"{e['line']} ({mark(world, problem, e)})" for e in examples))
            else:
                for e in examples:
                    print(f"  {name:8s}({mark(world, problem, e)}) " + " ".join(e["line"].split())[:400])
