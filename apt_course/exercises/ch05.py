"""Chapter 05 exercises: Bradley–Terry probability, its loss, and reading the reward at the last real token."""

from __future__ import annotations

import math

import torch

from ..reward_model import bradley_terry_loss
from . import ExerciseFailed, exercise, expect, expect_close


@exercise("ch05.bt_prob", "Bradley–Terry: the probability that chosen beats rejected")
def check_bt_prob(fn):
    expect(callable(fn), "answer with a function prob(r_chosen, r_rejected) -> float")
    for rc, rr in ((1.5, 0.5), (0.0, 0.0), (-2.0, 1.0), (3.0, -3.0)):
        expect_close(fn(rc, rr), 1 / (1 + math.exp(-(rc - rr))), 1e-6, f"prob({rc}, {rr})")


@exercise("ch05.bt_loss", "The Bradley–Terry loss of a batch of reward pairs")
def check_bt_loss(fn):
    expect(callable(fn), "answer with a function loss(r_chosen, r_rejected) -> scalar tensor")
    g = torch.Generator().manual_seed(5)
    rc, rr = torch.randn(16, generator=g) * 3, torch.randn(16, generator=g) * 3
    got = fn(rc, rr)
    expect(torch.is_tensor(got) and got.dim() == 0, "return a scalar tensor (the mean over the batch)")
    want = bradley_terry_loss(rc, rr)
    if torch.allclose(got, bradley_terry_loss(rr, rc), atol=1e-5):
        raise ExerciseFailed("sign flipped: the loss must be small when r_chosen > r_rejected")
    expect(torch.allclose(got, want, atol=1e-5), f"got {got.item():.4f}, expected {want.item():.4f}: "
           "-mean(log sigmoid(r_chosen - r_rejected)); use F.logsigmoid for stability")
    big = fn(torch.tensor([200.0]), torch.tensor([-200.0]))
    expect(torch.isfinite(big) and big.item() < 1e-6, "not numerically stable for a large margin: use F.logsigmoid")


@exercise("ch05.last_token", "Read the reward at each row's last real token (right padding)")
def check_last_token(fn):
    expect(callable(fn), "answer with a function pick(scores, attention_mask) -> tensor of shape (B,)")
    g = torch.Generator().manual_seed(6)
    scores = torch.randn(3, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    got = fn(scores, mask)
    expect(torch.is_tensor(got) and got.shape == (3,), f"return shape (3,), got {getattr(got, 'shape', got)}")
    if torch.allclose(got, scores[:, -1]):
        raise ExerciseFailed("position -1 is padding for short rows: find each row's last position with mask = 1")
    want = scores[torch.arange(3), mask.sum(-1) - 1]
    expect(torch.allclose(got, want), f"got {got.tolist()}, expected {want.tolist()}")
