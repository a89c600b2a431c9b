"""
Eqs. 3-5 of MASS: one bilevel meta-step for one target problem T with known answer R*.

    eq. 3  L_out = l(R* | T; theta + phi_K)                    the loss after the inner update
    eq. 4  dL_out/d eta = sum_i g_i dw_i/d eta,  g_i = dL_out/dw_i   (g_i < 0: more weight on i would help)
    eq. 5  grad_psi J = sum_i A_i grad_psi log pi_psi(p_i, a_i | T)   REINFORCE for the generator

g is computed by backpropagating through the K inner steps, in one of two modes:
  unroll   keep the graph of all K steps (create_graph=True) and differentiate once; memory grows with K.
  replay   keep only phi_0 .. phi_K and walk back from lambda_K = dL_out/dphi_K, recomputing one step's graph at a
           time; memory is one step's graph whatever K is, for about one extra forward-backward per step.
Both give the same numbers to round-off (test_mass.py checks them against each other and finite differences).

    python train.py --preset tiny    # runs meta-steps end to end
"""
import torch

from generator import log_prob, synthesize
from inner_loop import adapt, answer_nll, clip_by_norm, encode, inner_loss
from scorer import features, weights_from_scores


def outer_loss(model, phi, scale, target_batch):
    return answer_nll(model, [phi], scale, target_batch).sum()                 # eq. 3


def _leaf(phi):
    return {n: p.detach().requires_grad_() for n, p in phi.items()}


def attribution(model, phi0, scale, batch, weights, target_batch, alpha, K, mode="unroll", max_norm=None):
    """L_out after K inner steps and g = dL_out/dw, shape (m,), by differentiating through the inner loop.
    max_norm: the inner step's gradient clip (None: plain eq. 2), applied identically in both modes."""
    w = weights.detach().requires_grad_()
    if mode == "unroll":
        phis = adapt(model, phi0, scale, batch, w, alpha, K, True, max_norm)      # graph of all K steps
        L_out = outer_loss(model, phis[-1], scale, target_batch)
        (g,) = torch.autograd.grad(L_out, w)
        return L_out.detach(), g
    if mode != "replay":
        raise ValueError(f"meta-gradient mode must be 'unroll' or 'replay', not {mode!r}")
    phis = adapt(model, phi0, scale, batch, w, alpha, K, False, max_norm)         # phi_0 .. phi_K, no graph
    phi_K = _leaf(phis[-1])
    L_out = outer_loss(model, phi_K, scale, target_batch)
    lam = torch.autograd.grad(L_out, list(phi_K.values()))                       # lambda_K = dL_out/dphi_K
    g = torch.zeros_like(w)
    for k in reversed(range(K)):
        phi = _leaf(phis[k])
        loss = inner_loss(model, phi, scale, batch, w)
        grads = clip_by_norm(torch.autograd.grad(loss, list(phi.values()), create_graph=True), max_norm)
        step = [p - alpha * gr for p, gr in zip(phi.values(), grads)]            # phi_{k+1} as a function of phi_k, w
        *lam, dw = torch.autograd.grad(step, [*phi.values(), w], grad_outputs=lam)  # lambda_k, this step's dL/dw
        g += dw
    return L_out.detach(), g


def attribution_scale(g, typical_norm, how):
    """What one target's g is divided by. 'target': its own norm, so every target counts the same.
    'running': a running typical norm, so a target where weights matter more counts more, up to 3x typical."""
    if how == "target":
        return g.norm()
    if how == "running":
        return torch.clamp(g.norm() / 3, min=g.norm() if typical_norm is None else typical_norm)
    raise ValueError(f"eta gradient normalisation must be 'target' or 'running', not {how!r}")


def generator_reward(g, w, how, improvement):
    """Eq. 5's per-example reward and advantage, each (m,). how: 'attribution' pays -g_i (what more weight on
    example i would do to L_out), 'contribution' -w_i g_i (what example i did in the weighted update: an example
    the scorer distrusts earns about nothing). improvement: the post-update term, the same for every example.
    The advantage subtracts the per-example part's mean over the m samples (the baseline)."""
    if how not in ("attribution", "contribution"):
        raise ValueError(f"generator reward must be 'attribution' or 'contribution', not {how!r}")
    per_example = -g if how == "attribution" else -w * g
    reward = per_example + improvement
    return reward, reward - per_example.mean()


def reinforce_surrogate(logp, advantage):
    """-(1/m) sum_i A_i log pi(x_i): its gradient is eq. 5's policy gradient (negated, for a minimiser).
    Its value measures nothing; log the reward beside it."""
    return -(advantage.detach() * logp).mean()


def training_pairs(world, examples, target, answer_with, tok, with_target=False):
    """The valid examples as (prompts, answers) for the inner SFT; answers sampled or the base's greedy ones.
    Also whether the base's greedy answer agrees with each trained-on answer (a scorer feature).
    An example whose problem is T itself is left out unless with_target: its answer is a guess at T's answer,
    and training on it is self-verification, not learning from a practice problem (evaluate.py reports it apart)."""
    valid = [e for e in examples if e["valid"] and (with_target or e["problem"] != target)]
    answers = [e["greedy"] if answer_with == "greedy" else e["answer"] for e in valid]
    consistent = [world.same_answer(e["greedy"], a) for e, a in zip(valid, answers)]
    return (valid, [world.answer_prompt(tok, e["problem"]) for e in valid],
            [a + world.answer_end(tok) for a in answers], consistent)


def example_features(model, tok, world, target, valid, prompts, answers, consistent):
    """Step 2's inputs: scorer.features of the valid examples, given whether each p_i is T and each example as
    the generator wrote it (the world says how: a toy worked problem `42+23+18=65+18=83` as its work and its last
    value)."""
    is_target = [e["problem"] == target for e in valid]
    written = zip(*[world.as_written(e["line"], p, a) for e, p, a in zip(valid, prompts, answers)])
    return features(model, tok, world.answer_prompt(tok, target), prompts, answers, consistent, is_target,
                    tuple(map(list, written)))


def target_batch(world, tok, target, reference, max_len, device):
    """T and R* encoded for the outer loss: R* is the answer (toy world) or the reference solution (real data)."""
    return encode(tok, [world.answer_prompt(tok, target)], [reference + world.answer_end(tok)], device, max_len)


def meta_step(model, tok, world, eta, psi, phi0, target, reference, cfg, gen, running, grad_scale):
    """One target's contribution to the meta-gradients: accumulates into eta's and psi's .grad, returns metrics.
    reference: R*, the answer (toy world) or the reference solution (real data) that L_out is measured on.
    running: running means across targets, "improvement" (the reward baseline) and "g_norm"."""
    # step 1: synthesize m examples with the generator theta = base + psi
    examples = synthesize(model, psi, cfg.lora_scale, tok, world, target, cfg.m, cfg.temperature, cfg.max_new, gen)
    valid, prompts, answers, consistent = training_pairs(world, examples, target, cfg.answer_with, tok)
    parsed = sum(e["valid"] for e in examples) / len(examples)    # T itself included, though left out of the pool
    if not valid:
        return {"skipped": 1, "valid": parsed}
    # step 2: score them
    x = example_features(model, tok, world, target, valid, prompts, answers, consistent)
    w = weights_from_scores(eta(x))                                                  # (m,)
    # step 3 and eq. 3: the inner update and the loss after it; eq. 4: g_i = dL_out/dw_i
    batch = encode(tok, prompts, answers, model.device, cfg.max_len)
    T_batch = target_batch(world, tok, target, reference, cfg.max_len, model.device)
    with torch.no_grad():
        L_before = outer_loss(model, phi0, cfg.lora_scale, T_batch)
    L_after, g = attribution(model, phi0, cfg.lora_scale, batch, w, T_batch, cfg.alpha, cfg.K, cfg.meta_grad,
                             cfg.inner_clip or None)
    g_hat = g / (attribution_scale(g, running["g_norm"], cfg.eta_grad_norm) + 1e-8)  # raw g is heavy-tailed
    w.backward(g_hat * grad_scale)         # eq. 4: dL_out/d eta = sum_i g_i dw_i/d eta, into eta.grad
    # eq. 5: REINFORCE for psi, reward = -w_i g_i (or -g_i, --reward) + the post-update improvement, mean baseline.
    # reward_norm "target" scales every target's g to norm 1; "running" keeps its size relative to a typical target's
    improvement = (L_before - L_after).item()
    g_reward = g / (attribution_scale(g, running["g_norm"], cfg.reward_norm) + 1e-8)
    reward, advantage = generator_reward(g_reward, w.detach(), cfg.reward,
                                         cfg.improvement_coef * (improvement - running["improvement"]))
    logp = log_prob(model, psi, cfg.lora_scale, tok, world, target, [e["line"] for e in valid])  # (m,)
    surrogate = reinforce_surrogate(logp, advantage)
    (surrogate * grad_scale).backward()
    metrics = {"skipped": 0, "valid": parsed, "L_before": L_before.item(),
               "L_after": L_after.item(), "improvement": improvement, "reward": reward.mean().item(),
               "surrogate": surrogate.item(), "w_mean": w.mean().item(), "g_mean": g.mean().item(),
               "g_norm": g.norm().item()}
    if world.has_checker:   # diagnostics from the world's checker (the toy world); never used in training
        metrics.update(pool_quality(world, target, examples))
        correct = [world.solve(e["problem"]) == a.strip() for e, a in zip(valid, answers)]
        metrics.update(useful=(g < 0).float().mean().item(), w_correct_minus_wrong=_gap(w.detach(), correct))
    return metrics


def pool_quality(world, target, examples):
    """What the generator wrote for T, by the world's checker (a diagnostic, never used in training): shares of the
    m samples that are valid, right, T itself, and right with T's answer without being T (world.relation 'same')."""
    valid = [e for e in examples if e["valid"]]
    right = [e for e in valid if world.solve(e["problem"]) == e["answer"]]
    share = lambda rows: len(rows) / len(examples)
    return {"valid": share(valid), "correct": share(right),
            "is_target": share([e for e in valid if e["problem"] == target]),
            "same_answer": share([e for e in right if world.relation(e["problem"], target) == "same"])}


def _gap(w, correct):
    """Mean weight of correct examples (or any flagged ones) minus that of the others (nan without both kinds)."""
    c = torch.tensor(correct, dtype=torch.bool)
    if c.all() or not c.any():
        return float("nan")
    return (w[c].mean() - w[~c].mean()).item()
