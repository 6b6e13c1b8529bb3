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


def rm_step(rm, batch):
    # the chapter's pieces: the scalar head reads each row's last real token; Bradley-Terry on the two halves
    r = rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    r_chosen, r_rejected = r.chunk(2)                     # [chosen; rejected], as TRL's collator lays them out
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def _rm_step_flipped(rm, batch):
    r_chosen, r_rejected = rm(**batch).logits.squeeze(-1).chunk(2)
    return -F.logsigmoid(r_rejected - r_chosen).mean()


def _rm_step_probability(rm, batch):
    r_chosen, r_rejected = rm(**batch).logits.squeeze(-1).chunk(2)
    return -torch.sigmoid(r_chosen - r_rejected).mean()


def _rm_step_last_position(rm, batch):
    hidden = rm.model(**batch).last_hidden_state
    r_chosen, r_rejected = rm.score(hidden[:, -1]).squeeze(-1).chunk(2)  # position -1 is padding on short rows
    return -F.logsigmoid(r_chosen - r_rejected).mean()


SOLUTIONS = {
    "ch05.bt_prob": lambda: bt_prob,
    "ch05.bt_loss": lambda: bt_loss,
    "ch05.last_token": lambda: last_token,
    "ch05.rm_step": lambda: rm_step,
    "ch05.predict_hack": lambda: "c",
}
WRONG = {
    "ch05.bt_prob": lambda: (lambda rc, rr: rc / (rc + rr) if rc + rr else 0.5),
    "ch05.bt_loss": lambda: (lambda rc, rr: -torch.log(torch.sigmoid(rr - rc)).mean()),
    "ch05.last_token": lambda: (lambda scores, mask: scores[:, -1]),
    "ch05.rm_step": lambda: _rm_step_flipped,
    "ch05.predict_hack": lambda: "b",
}
ALSO_WRONG = {
    "ch05.rm_step": [(_rm_step_flipped, "sign"), (_rm_step_probability, "LOG"), (_rm_step_last_position, "padding")],
}
