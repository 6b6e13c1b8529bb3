"""Worked solutions of chapter 05's exercises (and one wrong answer each, to prove the checkers fail)."""

import math

import torch
import torch.nn.functional as F


def bt_prob(r_chosen, r_rejected):
    return 1 / (1 + math.exp(-(r_chosen - r_rejected)))   # sigma(r_c - r_r)


def bt_loss(r_chosen, r_rejected):
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def last_token(scores, attention_mask):
    last = attention_mask.sum(-1) - 1                      # right padding: the last 1 of each row
    return scores[torch.arange(scores.size(0)), last]


SOLUTIONS = {
    "ch05.bt_prob": lambda: bt_prob,
    "ch05.bt_loss": lambda: bt_loss,
    "ch05.last_token": lambda: last_token,
}
WRONG = {
    "ch05.bt_prob": lambda: (lambda rc, rr: rc / (rc + rr) if rc + rr else 0.5),
    "ch05.bt_loss": lambda: (lambda rc, rr: -torch.log(torch.sigmoid(rr - rc)).mean()),
    "ch05.last_token": lambda: (lambda scores, mask: scores[:, -1]),
}
