"""Worked solutions (and plausible wrong answers) for the chapter 09 exercises."""

import torch


def group_advantages():
    def advantages(rewards, G):
        r = torch.as_tensor(rewards, dtype=torch.float32).view(-1, G)
        return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()

    return advantages


def kl_k3():
    def k3(logp, ref_logp):
        d = ref_logp - logp
        return d.exp() - d - 1

    return k3


def aggregate():
    def agg(per_token, mask, loss_type, max_len):
        if loss_type == "grpo":  # mean per sequence, then over sequences
            return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
        if loss_type == "dr_grpo":  # one constant normaliser
            return (per_token * mask).sum() / (per_token.size(0) * max_len)
        return (per_token * mask).sum() / mask.sum()  # dapo: every token of the batch counts once

    return agg


def zero_variance():
    def p_zero(p, G):
        return p**G + (1 - p) ** G  # all right, or all wrong

    return p_zero


def _batch_normalised(rewards, G):
    r = torch.as_tensor(rewards, dtype=torch.float32)
    return (r - r.mean()) / (r.std() + 1e-4)


SOLUTIONS = {
    "ch09.group_advantages": group_advantages,
    "ch09.kl_k3": kl_k3,
    "ch09.aggregate": aggregate,
    "ch09.zero_variance": zero_variance,
}

WRONG = {
    "ch09.group_advantages": lambda: _batch_normalised,
    "ch09.kl_k3": lambda: lambda logp, ref_logp: logp - ref_logp,  # k1: can be negative
    "ch09.aggregate": lambda: lambda per_token, mask, loss_type, max_len: (per_token * mask).sum() / mask.sum(),
    "ch09.zero_variance": lambda: lambda p, G: p**G,  # forgets the all-wrong groups
}
