"""
Step 1 of MASS: self-synthesis. The model, prompted with a target problem T, writes m practice examples.

The generator is theta = base + psi: the frozen base with a trainable LoRA adapter psi (B = 0 at the start, so
the untrained generator is the base model itself). psi is trained by REINFORCE in meta_step.py, which needs
log pi_psi(p_i, a_i | T) with gradient; sampling itself runs without gradient.

Sampling is a short loop of our own through `functional_call` (examples are ~20 tokens, so no KV cache is
needed): `model.generate` cannot take the adapter as a parameter override.

    python generator.py RUN_DIR    # samples practice problems from a saved base model (default runs/default)
"""
import re
import sys

import torch

import tasks
from inner_loop import answer_nll, encode, forward


def prompt_for(target):
    """The generator's prompt: the target, marked as one to write practice problems for."""
    return f"{tasks.BOS}{tasks.TARGET_MARK}{target}\n"


@torch.no_grad()
def decode(model, adapters, scale, tok, prompts, max_new, temperature=0.0, gen=None, stop="\n"):
    """Continue each prompt until `stop` or EOS, at most max_new tokens; greedy when temperature is 0.
    Prompts of different lengths are left-padded, with an attention mask and matching position ids."""
    encoded = [tok(p)["input_ids"] for p in prompts]
    L = max(map(len, encoded))
    device = model.device
    ids = torch.tensor([[tok.pad_token_id] * (L - len(e)) + e for e in encoded], device=device)    # (n, L)
    attention = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in encoded], device=device)  # (n, L)
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    for _ in range(max_new):
        positions = (attention.cumsum(1) - 1).clamp(min=0)
        logits = forward(model, adapters, scale, ids, attention_mask=attention, position_ids=positions)[:, -1]
        if temperature > 0:  # sample on the CPU so that a seeded generator gives the same text on any device
            probs = torch.softmax(logits.float().cpu() / temperature, dim=-1)              # (n, V)
            next_ids = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(device)     # (n,)
        else:
            next_ids = logits.argmax(-1)                                                     # (n,)
        ids = torch.cat([ids, next_ids[:, None]], 1)
        attention = torch.cat([attention, torch.ones_like(next_ids)[:, None]], 1)
        for i, t in enumerate(next_ids.tolist()):
            if not done[i]:
                out[i].append(t)
                done[i] = t == tok.eos_token_id or stop in tok.decode(out[i])
        if all(done):
            break
    return [tok.decode(o, skip_special_tokens=True).split(stop)[0] for o in out]


def parse(line):
    """(problem, answer) from a generated line 'problem=answer', or None when it is not well-formed."""
    cut = line.rfind("=") + 1
    problem, answer = line[:cut], line[cut:]
    if cut == 0 or tasks.domain_of(problem) is None or not re.fullmatch(r"\d{1,6}", answer):
        return None
    return problem, answer


def synthesize(model, psi, scale, tok, target, m, temperature, max_new, gen):
    """Step 1: m sampled lines for target T, parsed. Each valid example also gets the base model's greedy
    answer to its problem (`greedy`), used as a self-consistency feature and optionally as its answer."""
    lines = decode(model, [psi], scale, tok, [prompt_for(target)] * m, max_new, temperature, gen)
    parsed = [parse(line) for line in lines]
    valid = [p for p in parsed if p is not None]
    greedy = decode(model, [], scale, tok, [tasks.BOS + p for p, _ in valid], max_new) if valid else []
    greedy = iter(greedy)
    return [{"line": line, "valid": p is not None, "problem": p and p[0], "answer": p and p[1],
             "greedy": p and next(greedy)} for line, p in zip(lines, parsed)]


def log_prob(model, psi, scale, tok, target, lines):
    """log pi_psi(line_i + newline | prompt(T)) for each line, shape (m,), differentiable in psi."""
    batch = encode(tok, [prompt_for(target)] * len(lines), [line + "\n" for line in lines], model.device)
    return -answer_nll(model, [psi], scale, batch)


if __name__ == "__main__":
    import base_model
    model, tok = base_model.load((sys.argv[1:] or ["runs/default"])[0] + "/base")
    gen = torch.Generator().manual_seed(0)
    for domain, problem, answer in tasks.heldout_targets(6, seed=0):
        examples = synthesize(model, {}, 1.0, tok, problem, 4, 1.0, 24, gen)
        shown = [f"{e['line']} ({'ok' if e['valid'] and tasks.solve(e['problem']) == e['answer'] else 'x'})"
                 for e in examples]
        print(f"{problem:18s} -> " + "  ".join(shown))
