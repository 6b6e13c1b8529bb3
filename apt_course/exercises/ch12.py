"""Chapter 12 exercises: a noise schedule, Gumbel noise by the inverse CDF, the gradient under logit noise,
and the internalisation curriculum's targets."""

from __future__ import annotations

import math

import torch

from ..data import storm_record
from ..storm import EULER_GAMMA, GUMBEL_VARIANCE, noise_ratio, staged_completion
from . import exercise, expect, expect_close


def _need_function(fn, name):
    expect(callable(fn), f"pass your function itself (e.g. `{name}`), not {type(fn).__name__}")


@exercise("ch12.schedule", "noise schedules: cosine, linear, constant")
def check_schedule(fn):
    _need_function(fn, "ratio")
    for schedule in ("cosine", "linear", "constant"):
        for r0 in (0.1, 0.3, 0.5):
            for t in (0.0, 0.25, 0.5, 0.75, 1.0):
                got = fn(t, r0, schedule)
                expect(got is not None, "your function returned None: did you forget `return`?")
                want = noise_ratio(t, r0, schedule)
                half_cos = r0 * math.cos(math.pi * t / 2)
                if schedule == "cosine" and abs(float(got) - half_cos) < 1e-9 and abs(want - half_cos) > 1e-9:
                    expect(False, "that is r0·cos(πt/2); the cosine schedule is r0·(1 + cos πt)/2")
                expect_close(got, want, 1e-9, f"{schedule} ratio at t = {t}, r0 = {r0}")
    try:
        fn(0.5, 0.3, "cosin")
    except ValueError:
        pass
    else:
        expect(False, "an unknown schedule name must raise ValueError (a typo should not silently mean 'constant')")


@exercise("ch12.gumbel", "Gumbel noise by the inverse CDF")
def check_gumbel(fn):
    _need_function(fn, "gumbel")
    n = 200_000
    g = fn((n,), torch.Generator().manual_seed(0))
    expect(isinstance(g, torch.Tensor) and g.shape == (n,), f"return a tensor of the asked shape ({n},)")
    expect(bool(torch.isfinite(g).all()), "some samples are inf or nan: keep u strictly inside (0, 1) before the logs")
    again = fn((n,), torch.Generator().manual_seed(0))
    expect(torch.equal(g, again), "two calls with the same seeded generator differ: draw u with `generator=`")
    g = g.double()
    se_mean = math.sqrt(GUMBEL_VARIANCE / n)
    if abs(g.mean().item() + EULER_GAMMA) < 6 * se_mean:
        expect(False, "your mean is -γ: that is log(-log u), the sign is flipped; g = -log(-log u)")
    expect(abs(g.mean().item() - EULER_GAMMA) < 6 * se_mean,
           f"the mean of your samples is {g.mean().item():.4f}, a standard Gumbel has mean γ = {EULER_GAMMA:.4f}")
    expect(abs(g.var().item() - GUMBEL_VARIANCE) < 0.05,
           f"the variance of your samples is {g.var().item():.4f}, a standard Gumbel has π²/6 = {GUMBEL_VARIANCE:.4f}")


@exercise("ch12.noisy_gradient", "what logit noise does to the gradient")
def check_noisy_gradient(fn):
    _need_function(fn, "noisy_grad")
    gen = torch.Generator().manual_seed(3)
    z = torch.randn(5, 7, generator=gen) * 2
    y = torch.randint(0, 7, (5,), generator=gen)
    g = -torch.log(-torch.log(torch.rand(5, 7, generator=gen).clamp(1e-12, 1 - 1e-7)))
    for ratio in (0.0, 0.3, 1.0):
        got = fn(z.clone(), y, g, ratio)
        expect(isinstance(got, torch.Tensor) and got.shape == z.shape, "return one gradient entry per logit, shape "
               "(N, V) like the logits")
        zz = z.clone().requires_grad_(True)
        torch.nn.functional.cross_entropy(zz + ratio * g, y, reduction="sum").backward()
        if ratio > 0 and torch.allclose(got, torch.softmax(z, -1) - torch.nn.functional.one_hot(y, 7), atol=1e-5):
            expect(False, "that is the clean gradient softmax(z) - onehot(y): the noise enters the softmax")
        expect(torch.allclose(got, zz.grad, atol=1e-5), f"wrong at ratio {ratio}: d/dz CE(z + r·g, y) for each row")
        shifted = fn(z.clone(), y, g + 5.0, ratio)
        expect(torch.allclose(got, shifted, atol=1e-5), "adding the same constant to every noise value must not change "
               "the gradient (softmax ignores a shared shift)")


@exercise("ch12.curriculum", "stepwise internalisation: the target at each stage")
def check_curriculum(fn):
    _need_function(fn, "staged")
    rec = storm_record("add 47 38", ["7+8=15", "4+3+1=8"], "85", "tiny-world", ";")
    long = storm_record("q", ["a", "b", "c", "d"], "ans", "apt", "\n")
    for r in (rec, long):
        for removed in range(len(r["steps"]) + 2):
            got = fn(r["steps"], r["answer"], removed, r["step_sep"])
            want = staged_completion(r, removed)
            if removed == 1 and got == "<think>" + r["step_sep"].join(r["steps"][:-1]) + "</think>" + r["answer"]:
                expect(False, "you dropped the last step: stepwise internalisation removes steps from the *front* "
                       "(the first computations are the first to be done silently)")
            expect(got == want, f"{removed} step(s) removed from {r['steps']}: want {want!r}, got {got!r}")
