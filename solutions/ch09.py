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


def grpo_step():
    # the chapter's pieces: group advantages of the rewards, the per-token log-probs of the completions (with
    # gradients), and the clipped loss with the k3 leash, averaged over every completion token ("dapo")
    from apt_course.grpo import group_advantages as package_group_advantages
    from apt_course.grpo import grpo_loss
    from apt_course.lm import completion_logprobs

    def step(model, batch, G, beta, epsilon):
        adv = package_group_advantages(batch["rewards"], G)
        logp = completion_logprobs(model, batch, "none")
        return grpo_loss(logp, batch["old_logp"], adv, batch["completion_mask"], batch["ref_logp"], beta, epsilon,
                         loss_type="dapo", kl_correction=False)[0]

    return step


def _grpo_step_variant(batch_norm=False, kl=True, loss_type="dapo"):
    from apt_course.grpo import grpo_loss
    from apt_course.lm import completion_logprobs

    def step(model, batch, G, beta, epsilon):
        adv = (_batch_normalised if batch_norm else group_advantages())(batch["rewards"], G)
        logp = completion_logprobs(model, batch, "none")
        return grpo_loss(logp, batch["old_logp"], adv, batch["completion_mask"], batch["ref_logp"],
                         beta if kl else 0.0, epsilon, loss_type=loss_type, kl_correction=False)[0]

    return step


SOLUTIONS = {
    "ch09.group_advantages": group_advantages,
    "ch09.kl_k3": kl_k3,
    "ch09.aggregate": aggregate,
    "ch09.zero_variance": zero_variance,
    "ch09.grpo_step": grpo_step,
    "ch09.predict_mu2": lambda: "a",  # the first step is on-policy: ratio 1, the same gradient
}

WRONG = {
    "ch09.group_advantages": lambda: _batch_normalised,
    "ch09.kl_k3": lambda: lambda logp, ref_logp: logp - ref_logp,  # k1: can be negative
    "ch09.aggregate": lambda: lambda per_token, mask, loss_type, max_len: (per_token * mask).sum() / mask.sum(),
    "ch09.zero_variance": lambda: lambda p, G: p**G,  # forgets the all-wrong groups
    "ch09.grpo_step": lambda: _grpo_step_variant(batch_norm=True),
    "ch09.predict_mu2": lambda: "b",
}
ALSO_WRONG = {
    "ch09.grpo_step": [(_grpo_step_variant(batch_norm=True), "whole batch"), (_grpo_step_variant(kl=False), "KL"),
                       (_grpo_step_variant(loss_type="grpo"), "aggregation")],
}
