"""Chapter 09 exercises: group advantages, the k3 KL estimator, loss aggregation, zero-variance groups."""

from __future__ import annotations

import math

import torch

from ..grpo import group_advantages, kl_k3
from . import exercise, expect, expect_close


def _need_function(fn, name):
    expect(callable(fn), f"pass your function itself (e.g. `{name}`), not {type(fn).__name__}")


@exercise("ch09.group_advantages", "group-normalised advantages")
def check_group_advantages(fn):
    _need_function(fn, "advantages")
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (24,), generator=g).float()
    rewards[:4] = 1.0  # a group that is all correct: no signal
    for G in (4, 8):
        got = fn(rewards.clone(), G)
        expect(got is not None, "your function returned None: did you forget `return`?")
        got = torch.as_tensor(got, dtype=torch.float32).flatten()
        want = group_advantages(rewards, G)
        expect(got.shape == want.shape, f"one advantage per completion: {tuple(want.shape)}, got {tuple(got.shape)}")
        batch = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        expect(not torch.allclose(got, batch, atol=1e-3), "you normalised over the whole batch: the baseline is each "
               "prompt's own group (view the rewards as (-1, G) and reduce over dim 1)")
        expect(torch.allclose(got[:4], torch.zeros(4), atol=1e-4),
               "a group whose rewards all tie must get advantage 0 (divide by std + 1e-4, never by 0)")
        expect(torch.allclose(got, want, atol=2e-3), f"wrong for G = {G}: A_i = (r_i - mean_group) / (std_group + 1e-4), "
               "with the unbiased std (torch's default, as TRL)")


@exercise("ch09.kl_k3", "the k3 KL estimator")
def check_kl_k3(fn):
    _need_function(fn, "k3")
    torch.manual_seed(0)
    logp, ref = torch.randn(5, 7) - 2, torch.randn(5, 7) - 2
    got = fn(logp, ref)
    expect(isinstance(got, torch.Tensor) and got.shape == logp.shape, "return one value per token, a tensor shaped "
           "like logp")
    expect(not torch.allclose(got, logp - ref, atol=1e-5), "that is k1 = log π - log π_ref: unbiased but it can be "
           "negative; k3 = r - log r - 1 with r = π_ref / π")
    expect(bool((got >= -1e-6).all()), "k3 is never negative (x - 1 >= log x): check the signs")
    expect(torch.allclose(got, kl_k3(logp, ref), atol=1e-5), "k3 = exp(ref - logp) - (ref - logp) - 1")
    # unbiased: the mean of k3 over samples from π equals KL(π || π_ref)
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    exact = float((p * (p / q).log()).sum())
    expect_close(float((p * fn(p.log(), q.log())).sum()), exact, 1e-5, "E_π[k3] (should equal KL(π‖π_ref))")


@exercise("ch09.aggregate", "loss aggregation: grpo, dr_grpo, dapo")
def check_aggregate(fn):
    _need_function(fn, "aggregate")
    torch.manual_seed(1)
    per_token = torch.randn(4, 6)
    mask = (torch.arange(6)[None] < torch.tensor([[1], [3], [6], [2]])).float()
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        got = fn(per_token, mask, loss_type, 6)
        expect(got is not None, f"your function returned None for {loss_type!r}")
        want = {"grpo": ((per_token * mask).sum(-1) / mask.sum(-1)).mean(),
                "dr_grpo": (per_token * mask).sum() / (4 * 6),
                "dapo": (per_token * mask).sum() / mask.sum()}[loss_type]
        expect_close(got, float(want), 1e-5, f"your {loss_type!r} loss")


@exercise("ch09.zero_variance", "how often a group carries no signal")
def check_zero_variance(fn):
    _need_function(fn, "p_zero")
    for p, G in ((0.5, 2), (0.9, 8), (0.1, 8), (0.3, 16), (0.0, 4)):
        got = fn(p, G)
        want = p**G + (1 - p) ** G
        if abs(float(got) - p**G) < 1e-9 and abs(want - p**G) > 1e-6:
            expect(False, "you counted only the all-correct groups: an all-wrong group ties too")
        expect_close(got, want, 1e-9, f"P(zero variance) for p = {p}, G = {G}")
    expect(math.isclose(fn(0.5, 8), 2 * 0.5**8), "check p = 0.5, G = 8")
