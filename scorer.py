"""
Step 2 of MASS: the scorer eta gives each synthetic example a score s_i and a weight w_i = 2 sigma(s_i).

A zero score is weight 1, and the last layer starts at zero, so meta-training starts from uniform weights.
Weights can fall to 0: the scorer can filter an example out, or all of them, which means no update at all.
(The alternative w = m softmax(s) keeps the total fixed and so can never decline to adapt.)

Features of example i, all from the frozen base model (never from the toy world's checker):
  - the model's confidence in a_i: mean and minimum token log-probability of a_i given p_i,
  - its confidence in the example as written: mean and minimum log-probability of what follows the last '=' of a
    worked problem (`42+23+18=65+18=83`: the last step, 83 given the rest); for real data, the same as the first two,
  - self-consistency: does the base's greedy answer to p_i equal a_i,
  - p_i is T itself: a_i is a candidate answer to T (such examples are left out of the pools, meta_step.py, except
    in the evaluation's with-T comparison, so this is -1 almost everywhere),
  - closeness to the target: cosine of the pooled hidden states of T and of the example, and the two pooled
    representations themselves (unit length), so the scorer can learn which kinds of problems help which targets,
  - answer length (log of its token count),
  - the base's confidence on the target itself (log-prob of its most likely first answer token), so that the
    scorer can learn when adapting is worth it at all: a model already sure of T has little to gain.

    python -m pytest test_mass.py -k scorer
"""
import torch
import torch.nn.functional as F

from inner_loop import encode, forward

N_SCALARS = 9


class Scorer(torch.nn.Module):
    """eta: a small MLP from an example's features to its score s_i."""

    def __init__(self, hidden_size, width=32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(N_SCALARS + 2 * hidden_size, width), torch.nn.Tanh(),
                                       torch.nn.Linear(width, 1))
        torch.nn.init.zeros_(self.net[-1].weight)   # s_i = 0, so w_i = 1: training starts from uniform weights
        torch.nn.init.zeros_(self.net[-1].bias)

    def forward(self, features):                     # (m, F) -> (m,)
        return self.net(features).squeeze(-1)


def weights_from_scores(scores):
    return 2 * torch.sigmoid(scores)                 # w_i = 2 sigma(s_i): s = 0 gives 1, s -> -inf gives 0


@torch.no_grad()
def pooled(model, tok, texts):
    """Mean of the last hidden layer over each text's tokens, unit length (n, d), and the logits (n, L, V)."""
    batch = encode(tok, [""] * len(texts), texts, model.device)       # mask = every real token
    out = model(input_ids=batch["ids"], output_hidden_states=True, use_cache=False)
    hidden = out.hidden_states[-1]                                    # (n, L, d)
    mean = (hidden * batch["mask"][..., None]).sum(1) / batch["mask"].sum(1, keepdim=True)
    return F.normalize(mean.float(), dim=-1), out.logits


@torch.no_grad()
def answer_logp(model, tok, prompts, answers):
    """Mean and minimum token log-probability of each answer given its prompt, and its token count; each (m,)."""
    batch = encode(tok, prompts, answers, model.device)
    logits = forward(model, [], 1.0, batch["ids"]).float()                      # (m, L, V)
    token_logp = F.log_softmax(logits[:, :-1], -1).gather(-1, batch["ids"][:, 1:, None]).squeeze(-1)
    mask = batch["mask"][:, 1:]                                                 # (m, L-1)
    n_tokens = mask.sum(1)
    return (token_logp * mask).sum(1) / n_tokens, token_logp.masked_fill(mask == 0, 0.0).min(1).values, n_tokens


@torch.no_grad()
def features(model, tok, target_prompt, prompts, answers, consistent, is_target, written):
    """(m, N_SCALARS + 2d) features of the examples (p_i, a_i) for target T, from the frozen base.
    prompts, answers: the examples as trained on (a_i ends with its end mark); target_prompt: T as it is answered;
    consistent: does the base's greedy answer to p_i agree with a_i; is_target: is p_i the text of T;
    written: (prompts, answers) of each example as the generator wrote it (its worked form)."""
    mean_logp, min_logp, n_tokens = answer_logp(model, tok, prompts, answers)
    written_mean, written_min, _ = answer_logp(model, tok, *written)
    as_sign = lambda flags: 2 * torch.tensor(flags, dtype=torch.float32, device=model.device) - 1   # True 1, False -1
    h, _ = pooled(model, tok, [p + a.strip() for p, a in zip(prompts, answers)])   # (m, d)
    h_target, target_logits = pooled(model, tok, [target_prompt])                   # (1, d), (1, L, V)
    h_target = h_target.expand_as(h)                                                # (m, d)
    cosine = (h * h_target).sum(1)
    target_confidence = F.log_softmax(target_logits[0, -1].float(), -1).max()    # the base's certainty on T
    logp = lambda x: x.clamp(min=-10) / 2
    scalars = torch.stack([logp(mean_logp), logp(min_logp), logp(written_mean), logp(written_min),
                           as_sign(consistent), as_sign(is_target), cosine, torch.log(n_tokens) - 1,
                           target_confidence.expand_as(cosine)], dim=1)           # (m, N_SCALARS)
    return torch.cat([scalars, h, h_target], dim=1)
