"""
Step 1 of MASS: self-synthesis. The model, prompted with a target problem T, writes m practice examples.

The generator is theta = base + psi: the frozen base with a trainable LoRA adapter psi (B = 0 at the start, so
the untrained generator is the base model itself). psi is trained by REINFORCE in meta_step.py, which needs
log pi_psi(p_i, a_i | T) with gradient; sampling itself runs without gradient.

Sampling is a short loop of our own through `functional_call` (toy examples are ~20 tokens, so no KV cache is
needed; a worked solution of a few hundred tokens costs a forward over the whole text per token, see the README):
`model.generate` cannot take the adapter as a parameter override.

Real problems (MATH, GSM8K) are natural language: the prompt asks for a similar practice problem with a worked
solution ending in \\boxed{...} (in the tokenizer's chat template when it has one), sampling stops at EOS, and an
example is valid when it has a problem and a final answer that tasks.extract_answer finds.

    python generator.py RUN_DIR    # samples practice problems from a saved base model (default runs/default)
"""
import sys

import torch

import tasks
from inner_loop import answer_nll, encode, forward


def prompt_for(target):
    """The generator's prompt: the target, marked as one to write practice problems for."""
    return f"{tasks.BOS}{tasks.TARGET_MARK}{target}\n"


# ---- natural-language prompts, for real problems

SOLVE = "Solve the following math problem. Put the final answer in \\boxed{{}}.\n\n{problem}"
PRACTICE = ("Here is a math problem:\n\n{target}\n\nWrite one new practice problem like it (same topic, same kind of "
            "reasoning, different numbers), then solve it. Use exactly this format:\n"
            "Problem: <the practice problem>\n"
            "Solution: <a worked solution that ends with the final answer in \\boxed{{}}>")


def chat(tok, text):
    """text as a user turn in the tokenizer's chat template, ready for the assistant's reply; plain text without one."""
    if not tok.chat_template:
        return text + "\n\n"
    prompt = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    if tok.bos_token and prompt.startswith(tok.bos_token) and tok.bos_token_id in tok("")["input_ids"]:
        prompt = prompt[len(tok.bos_token):]   # the tokenizer adds BOS itself (Llama 3): not twice
    return prompt


def answer_prompt(tok, problem, natural):
    """The text an answer to `problem` follows: the toy world's fresh line, or the solve instruction."""
    return chat(tok, SOLVE.format(problem=problem)) if natural else tasks.BOS + problem


def practice_prompt(tok, target, natural):
    """The generator's prompt for T: the toy world's mark, or the request for a worked practice problem."""
    return chat(tok, PRACTICE.format(target=target)) if natural else prompt_for(target)


def answer_end(tok, natural):
    """What ends an answer: a newline in the toy world, EOS (the end of the assistant's turn) in natural language."""
    return (tok.eos_token or "") if natural else "\n"


def eos_ids(model, tok):
    """The token ids that end a text: the tokenizer's EOS and the model's (Llama 3 Instruct has several)."""
    config_ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    config_ids = config_ids if isinstance(config_ids, list) else [config_ids]
    return {i for i in [tok.eos_token_id, *config_ids] if i is not None}


@torch.no_grad()
def decode(model, adapters, scale, tok, prompts, max_new, temperature=0.0, gen=None, stop="\n"):
    """Continue each prompt until `stop` (None: EOS only) or EOS, at most max_new tokens; greedy when temperature is 0.
    Prompts of different lengths are left-padded, with an attention mask and matching position ids."""
    encoded = [tok(p)["input_ids"] for p in prompts]
    L = max(map(len, encoded))
    device = model.device
    ids = torch.tensor([[tok.pad_token_id] * (L - len(e)) + e for e in encoded], device=device)    # (n, L)
    attention = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in encoded], device=device)  # (n, L)
    out = [[] for _ in prompts]
    done = [False] * len(prompts)
    eos = eos_ids(model, tok)
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
                done[i] = t in eos or (stop is not None and stop in tok.decode(out[i]))
        if all(done):
            break
    texts = [tok.decode(o, skip_special_tokens=True) for o in out]
    return texts if stop is None else [t.split(stop)[0] for t in texts]


def parse(line):
    """(problem, answer) from a generated construction `35+23=58`: (`x+23=58;x=`, `35`); None when the line is no
    construction of any domain. The toy generator writes equations solved forward (tasks.py says why)."""
    return tasks.from_construction(line)


def parse_worked(text):
    """(problem, solution) from 'Problem: ... Solution: ...' whose solution has a final answer, or None."""
    head, found, solution = text.partition("Solution:")
    problem = head.split("Problem:")[-1].strip(" *#\n")
    solution = solution.strip(" *\n")
    if not found or not problem or tasks.extract_answer(solution) is None:
        return None
    return problem, solution


def synthesize(model, psi, scale, tok, target, m, temperature, max_new, gen, natural=False):
    """Step 1: m sampled lines for target T, parsed. Each valid example also gets the base model's greedy
    answer to its problem (`greedy`), used as a self-consistency feature and optionally as its answer.
    natural: T is a real problem; an example's answer is then its worked solution (and `greedy` one too)."""
    stop = None if natural else "\n"
    prompts = [practice_prompt(tok, target, natural)] * m
    lines = decode(model, [psi], scale, tok, prompts, max_new, temperature, gen, stop)
    parsed = [parse_worked(line) if natural else parse(line) for line in lines]
    valid = [p for p in parsed if p is not None]
    prompts = [answer_prompt(tok, p, natural) for p, _ in valid]
    greedy = iter(decode(model, [], scale, tok, prompts, max_new, stop=stop) if valid else [])
    return [{"line": line, "valid": p is not None, "problem": p and p[0], "answer": p and p[1],
             "greedy": p and next(greedy)} for line, p in zip(lines, parsed)]


def log_prob(model, psi, scale, tok, target, lines, natural=False):
    """log pi_psi(line_i + its end | prompt(T)) for each line, shape (m,), differentiable in psi."""
    end = answer_end(tok, natural)
    batch = encode(tok, [practice_prompt(tok, target, natural)] * len(lines), [line + end for line in lines],
                   model.device)
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
