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


def dpo_step():
    # the chapter's pieces: summed completion log-probs of [chosen; rejected] rows, the reference's under
    # no_grad (it is frozen), and the DPO loss of those four numbers per pair
    from apt_course.dpo import dpo_loss as package_dpo_loss
    from apt_course.lm import completion_logprobs

    def step(policy, ref, batch, beta):
        pi_c, pi_r = completion_logprobs(policy, batch, "sum").chunk(2)
        with torch.no_grad():
            ref_c, ref_r = completion_logprobs(ref, batch, "sum").chunk(2)
        return package_dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)[0]

    return step


def _dpo_step_variant(reference=True, no_grad=True, reduction="sum"):
    from apt_course.lm import completion_logprobs

    def step(policy, ref, batch, beta):
        pi_c, pi_r = completion_logprobs(policy, batch, reduction).chunk(2)
        if not reference:
            return -F.logsigmoid(beta * (pi_c - pi_r)).mean()
        if no_grad:
            with torch.no_grad():
                ref_c, ref_r = completion_logprobs(ref, batch, reduction).chunk(2)
        else:
            ref_c, ref_r = completion_logprobs(ref, batch, reduction).chunk(2)
        return -F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean()

    return step


SOLUTIONS = {
    "ch07.dpo_loss": dpo_loss,
    "ch07.simpo_from_sums": simpo_from_sums,
    "ch07.pair_weight": pair_weight,
    "ch07.dpo_step": dpo_step,
    "ch07.predict_beta0": lambda: "b",
}

WRONG = {
    # forgets the reference model
    "ch07.dpo_loss": lambda: lambda pi_c, pi_r, ref_c, ref_r, beta: -F.logsigmoid(beta * (pi_c - pi_r)).mean(),
    # forgets the length normalisation
    "ch07.simpo_from_sums": lambda: lambda sc, sr, lc, lr, beta, gamma: -F.logsigmoid(beta * (sc - sr) - gamma).mean(),
    # the probability the pair is ranked right, not the weight of its gradient
    "ch07.pair_weight": lambda: lambda margin, beta: torch.sigmoid(beta * margin),
    "ch07.dpo_step": lambda: _dpo_step_variant(reference=False),
    "ch07.predict_beta0": lambda: "a",  # chapter 06's answer, not DPO's
}
ALSO_WRONG = {
    "ch07.dpo_step": [(_dpo_step_variant(reference=False), "reference model is missing"),
                      (_dpo_step_variant(no_grad=False), "torch.no_grad"),
                      (_dpo_step_variant(reduction="mean"), "sums")],
}
