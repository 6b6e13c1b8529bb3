"""Chapter 08 exercises: log-odds of a sequence, the ORPO loss, the memory a trainer holds."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import exercise, expect, expect_close


def _need_function(fn, name):
    expect(callable(fn), f"pass your function itself (e.g. `{name}`), not {type(fn).__name__}")


@exercise("ch08.log_odds", "log-odds of a sequence")
def check_log_odds(fn):
    _need_function(fn, "log_odds")
    avg = torch.tensor([-0.01, -0.6931, -2.0, -12.0], dtype=torch.float64)
    got = fn(avg.clone())
    expect(got is not None, "your log_odds returned None: did you forget `return`?")
    got = torch.as_tensor(got, dtype=torch.float64)
    want = avg - torch.log(1 - torch.exp(avg))
    expect(got.shape == avg.shape, f"one value per sequence: shape {tuple(avg.shape)}, got {tuple(got.shape)}")
    expect(not torch.allclose(got, avg), "that is log P itself: the odds are P / (1 - P)")
    expect(torch.allclose(got, want, rtol=1e-6, atol=1e-8), "log odds = log P - log(1 - P), with log P = avg_logp")


@exercise("ch08.orpo_loss", "the ORPO loss")
def check_orpo_loss(fn):
    _need_function(fn, "orpo_loss")
    avg_c, avg_r = torch.tensor([-0.2, -1.0, -3.0]), torch.tensor([-0.5, -0.8, -6.0])
    for beta in (0.1, 1.0):
        out = fn(torch.tensor(1.5), avg_c, avg_r, beta)
        expect(isinstance(out, torch.Tensor) and out.dim() == 0, "return a scalar torch tensor")
        lo = lambda a: a - torch.log(-torch.expm1(a))  # noqa: E731
        ratio = lo(avg_c) - lo(avg_r)
        want = 1.5 - beta * F.logsigmoid(ratio).mean()
        flipped = 1.5 + beta * F.logsigmoid(ratio).mean()
        expect(abs(out.item() - flipped.item()) > 1e-6, "the odds-ratio term has the wrong sign: the loss SUBTRACTS "
                                                        "lambda * log sigmoid(log odds ratio)")
        expect(abs(out.item() - want.item()) < 1e-5, f"wrong for beta = {beta}: L = nll - beta * mean log "
                                                      "sigmoid(log odds(y_w) - log odds(y_l))")


@exercise("ch08.training_bytes", "memory a trainer holds")
def check_training_bytes(fn):
    _need_function(fn, "training_bytes")
    n, b = 135_000_000, 4
    orpo = fn(n, b, False)
    dpo = fn(n, b, True)
    expect(orpo is not None and dpo is not None, "your training_bytes returned None: did you forget `return`?")
    expect(not math.isclose(float(orpo), 3 * n * b), "gradients are one copy of the weights too: weights + gradients "
                                                     "+ AdamW's two moments")
    expect_close(orpo, 4 * n * b, 1, "bytes for ORPO (no reference)")
    expect_close(dpo, 5 * n * b, 1, "bytes for DPO (a frozen reference: weights only, no gradients or moments)")
