"""Chapter 02 exercises: returns-to-go, the gradient of log-softmax, the REINFORCE surrogate loss."""

from __future__ import annotations

import numpy as np
import torch

from ..reinforce import returns_to_go
from . import exercise, expect


def _need_function(fn, name):
    expect(callable(fn), f"pass your function itself (e.g. `{name}`), not {type(fn).__name__}")


@exercise("ch02.returns_to_go", "returns-to-go")
def check_returns_to_go(rtg):
    _need_function(rtg, "rtg")
    rng = np.random.default_rng(0)
    for gamma in (0.0, 0.5, 0.99, 1.0):
        r = rng.normal(size=7)
        got = rtg(r.copy(), gamma)
        expect(got is not None, "your rtg returned None: did you forget `return`?")
        got = np.asarray(got, dtype=np.float64)
        want = returns_to_go(r[:, None], gamma)[:, 0]
        expect(got.shape == want.shape, f"one return per step: shape {want.shape}, got {got.shape}")
        if np.allclose(got, want[::-1]) and not np.allclose(got, want):
            expect(False, "your returns run backwards in time: G_t sums the rewards from t to the END")
        expect(np.allclose(got, want), f"wrong for gamma = {gamma}: G_t = r_t + gamma * G_(t+1), G_T-1 = r_T-1")


@exercise("ch02.grad_log_softmax", "gradient of log softmax")
def check_grad_log_softmax(grad_logp):
    _need_function(grad_logp, "grad_logp")
    rng = np.random.default_rng(1)
    for n in (2, 3, 6):
        logits = rng.normal(size=n)
        a = int(rng.integers(n))
        got = grad_logp(logits.copy(), a)
        expect(got is not None, "your grad_logp returned None: did you forget `return`?")
        got = np.asarray(got, dtype=np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        want = np.eye(n)[a] - p
        expect(got.shape == (n,), f"one partial derivative per logit: shape ({n},), got {got.shape}")
        expect(not np.allclose(got, p - np.eye(n)[a]), "the sign is flipped: it is onehot(a) - softmax(logits)")
        expect(np.allclose(got, want, atol=1e-6), "d/dz_j log softmax(z)_a = 1[j = a] - softmax(z)_j")


@exercise("ch02.reinforce_loss", "the REINFORCE surrogate loss")
def check_reinforce_loss(loss_fn):
    _need_function(loss_fn, "loss")
    torch.manual_seed(0)
    T = 9
    logits = torch.randn(T, 2, requires_grad=True)
    actions = torch.randint(0, 2, (T,))
    logp = torch.log_softmax(logits, -1)[torch.arange(T), actions]
    returns, baseline = torch.randn(T) * 5 + 10, torch.randn(T, requires_grad=True)
    out = loss_fn(logp, returns, baseline)
    expect(isinstance(out, torch.Tensor) and out.dim() == 0, "return a scalar torch tensor (so .backward() works)")
    out.backward()
    expect(baseline.grad is None or torch.allclose(baseline.grad, torch.zeros(T)),
           "gradient flows into the baseline: use (returns - baseline).detach()")
    # by hand: d log softmax(z)_a / dz = onehot(a) - softmax(z); the loss is -(1/T) sum_t logp_t (G_t - b_t)
    onehot = torch.nn.functional.one_hot(actions, 2).float()
    adv = (returns - baseline.detach())[:, None]
    want = -(onehot - torch.softmax(logits.detach(), -1)) * adv / T
    expect(not torch.allclose(logits.grad, -want, atol=1e-5), "the sign is flipped: a loss is minimised, so negate")
    expect(torch.allclose(logits.grad, want, atol=1e-5),
           "gradient differs from -(1/T) sum_t grad log pi(a_t|s_t) (G_t - b_t): check the weights and the mean")
