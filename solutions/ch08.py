"""Worked solutions (and plausible wrong answers) for the chapter 08 exercises."""

import torch
import torch.nn.functional as F


def log_odds():
    def fn(avg_logp):
        return avg_logp - torch.log(-torch.expm1(avg_logp))  # log P - log(1 - P)

    return fn


def orpo_loss():
    def loss(nll, avg_c, avg_r, beta):
        ratio = log_odds()(avg_c) - log_odds()(avg_r)
        return nll - beta * F.logsigmoid(ratio).mean()

    return loss


def training_bytes():
    def fn(n_params, bytes_per_param, reference):
        trained = n_params * bytes_per_param * (1 + 1 + 2)  # weights, gradients, AdamW's two moments
        return trained + (n_params * bytes_per_param if reference else 0)

    return fn


def orpo_step():
    # the chapter's pieces: one forward pass of [chosen; rejected]; per-token log-probs; mean per answer (ORPO's
    # length-normalised P); the NLL of the chosen answers (over the prompt too when nll_on_prompt, as TRL);
    # then the loss of chapter 08: nll - beta * mean log sigmoid(log odds ratio)
    from apt_course.lm import completion_token_logprobs
    from apt_course.orpo import orpo_loss as package_orpo_loss

    def step(model, batch, beta, nll_on_prompt=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_token, mask = completion_token_logprobs(logits, batch, everywhere=nll_on_prompt)
        mask = mask.float()
        avg_c, avg_r = ((per_token * mask).sum(-1) / mask.sum(-1)).chunk(2)
        nll_mask = (batch["attention_mask"][:, 1:].float() if nll_on_prompt else mask).chunk(2)[0]
        nll = -(per_token.chunk(2)[0] * nll_mask).sum() / nll_mask.sum()
        return package_orpo_loss(nll, avg_c, avg_r, beta)[0]

    return step


def _orpo_step_variant(nll_weight=1.0, prompt_nll=False, summed=False):
    from apt_course.lm import completion_token_logprobs
    from apt_course.orpo import log_odds_ratio

    def step(model, batch, beta, nll_on_prompt=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_token, mask = completion_token_logprobs(logits, batch, everywhere=True)
        mask = mask.float()
        total = (per_token * mask).sum(-1)
        logp_c, logp_r = (total if summed else total / mask.sum(-1)).chunk(2)
        nll_mask = (batch["attention_mask"][:, 1:].float() if prompt_nll or nll_on_prompt else mask).chunk(2)[0]
        nll = -(per_token.chunk(2)[0] * nll_mask).sum() / nll_mask.sum()
        return nll_weight * nll - beta * F.logsigmoid(log_odds_ratio(logp_c, logp_r)).mean()

    return step


SOLUTIONS = {
    "ch08.log_odds": log_odds,
    "ch08.orpo_loss": orpo_loss,
    "ch08.training_bytes": training_bytes,
    "ch08.orpo_step": orpo_step,
    "ch08.predict_lambda0": lambda: "b",  # SFT on the chosen answers
    "ch08.predict_no_nll": lambda: "b",  # task accuracy stays at the base model's 0
}

WRONG = {
    "ch08.log_odds": lambda: lambda avg_logp: avg_logp,  # log P, not the log-odds
    "ch08.orpo_loss": lambda: lambda nll, c, r, beta: nll + beta * F.logsigmoid(
        (c - torch.log(-torch.expm1(c))) - (r - torch.log(-torch.expm1(r)))).mean(),  # sign flipped
    "ch08.training_bytes": lambda: lambda n, b, ref: n * b * (3 + (1 if ref else 0)),  # forgets gradients
    "ch08.orpo_step": lambda: _orpo_step_variant(nll_weight=0.0),  # drops the NLL term
    "ch08.predict_lambda0": lambda: "a",
    "ch08.predict_no_nll": lambda: "a",
}
ALSO_WRONG = {
    "ch08.orpo_step": [(_orpo_step_variant(nll_weight=0.0), "NLL term is missing"),
                       (_orpo_step_variant(prompt_nll=True), "TRL"), (_orpo_step_variant(summed=True), "summed")],
}
