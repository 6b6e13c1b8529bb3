"""Worked solutions (and plausible wrong answers) for the chapter 07 exercises."""

import torch
import torch.nn.functional as F


def dpo_loss():
    def loss(pi_c, pi_r, ref_c, ref_r, beta):
        return -F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean()

    return loss


def simpo_from_sums():
    def simpo(sum_c, sum_r, len_c, len_r, beta, gamma):
        return -F.logsigmoid(beta * (sum_c / len_c - sum_r / len_r) - gamma).mean()

    return simpo


def pair_weight():
    def weight(margin, beta):
        return torch.sigmoid(-beta * margin)

    return weight


SOLUTIONS = {
    "ch07.dpo_loss": dpo_loss,
    "ch07.simpo_from_sums": simpo_from_sums,
    "ch07.pair_weight": pair_weight,
}

WRONG = {
    # forgets the reference model
    "ch07.dpo_loss": lambda: lambda pi_c, pi_r, ref_c, ref_r, beta: -F.logsigmoid(beta * (pi_c - pi_r)).mean(),
    # forgets the length normalisation
    "ch07.simpo_from_sums": lambda: lambda sc, sr, lc, lr, beta, gamma: -F.logsigmoid(beta * (sc - sr) - gamma).mean(),
    # the probability the pair is ranked right, not the weight of its gradient
    "ch07.pair_weight": lambda: lambda margin, beta: torch.sigmoid(beta * margin),
}
