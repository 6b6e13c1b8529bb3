"""Worked solutions (and plausible wrong answers) for the chapter 12 exercises."""

import math

import torch


def schedule():
    def ratio(t, r0, schedule):
        if schedule == "cosine":
            return r0 * (1 + math.cos(math.pi * t)) / 2
        if schedule == "linear":
            return r0 * (1 - t)
        if schedule == "constant":
            return r0
        raise ValueError(f"unknown schedule {schedule!r}")

    return ratio


def gumbel():
    def sample(shape, generator):
        u = torch.rand(shape, generator=generator).clamp(1e-12, 1 - 1e-7)  # keep both logs finite
        return -torch.log(-torch.log(u))

    return sample


def noisy_gradient():
    def noisy_grad(logits, target, noise, ratio):
        # d/dz CE(z + r g, y) = softmax(z + r g) - onehot(y): the noise enters only through the softmax, so a
        # shift shared by all logits (the mean γ r of Gumbel noise) changes nothing
        p = torch.softmax(logits + ratio * noise, dim=-1)
        return p - torch.nn.functional.one_hot(target, logits.size(-1)).to(p.dtype)

    return noisy_grad


def curriculum():
    def staged(steps, answer, removed, sep):
        if removed >= len(steps):
            return answer
        return "<think>" + sep.join(steps[removed:]) + "</think>" + answer

    return staged


SOLUTIONS = {
    "ch12.schedule": schedule,
    "ch12.gumbel": gumbel,
    "ch12.noisy_gradient": noisy_gradient,
    "ch12.curriculum": curriculum,
}

WRONG = {
    # cos(πt/2): right at t = 0 and 1, wrong in between
    "ch12.schedule": lambda: lambda t, r0, schedule: r0 * math.cos(math.pi * t / 2) if schedule == "cosine"
    else (r0 * (1 - t) if schedule == "linear" else r0),
    "ch12.gumbel": lambda: lambda shape, generator: torch.log(-torch.log(torch.rand(shape, generator=generator)
                                                                        .clamp(1e-12, 1 - 1e-7))),
    "ch12.noisy_gradient": lambda: lambda logits, target, noise, ratio: torch.softmax(logits, -1)
    - torch.nn.functional.one_hot(target, logits.size(-1)).float(),
    "ch12.curriculum": lambda: lambda steps, answer, removed, sep: answer if removed >= len(steps)
    else "<think>" + sep.join(steps[:len(steps) - removed]) + "</think>" + answer,
}
