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


SOLUTIONS = {
    "ch08.log_odds": log_odds,
    "ch08.orpo_loss": orpo_loss,
    "ch08.training_bytes": training_bytes,
}

WRONG = {
    "ch08.log_odds": lambda: lambda avg_logp: avg_logp,  # log P, not the log-odds
    "ch08.orpo_loss": lambda: lambda nll, c, r, beta: nll + beta * F.logsigmoid(
        (c - torch.log(-torch.expm1(c))) - (r - torch.log(-torch.expm1(r)))).mean(),  # sign flipped
    "ch08.training_bytes": lambda: lambda n, b, ref: n * b * (3 + (1 if ref else 0)),  # forgets gradients
}
