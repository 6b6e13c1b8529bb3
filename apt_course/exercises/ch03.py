"""Chapter 03 exercises: the clipped objective, per-token returns of a completion, GAE."""

from __future__ import annotations

import numpy as np

from ..ppo import compute_gae
from . import exercise, expect, expect_close


@exercise("ch03.clipped_objective", "the clipped surrogate for one sample")
def check_clipped_objective(answer):
    expect(answer is not None, "replace None by your number: min(r A, clip(r, 0.8, 1.2) A) for r = 0.5, A = -1")
    try:
        value = float(answer)
    except (TypeError, ValueError):
        expect(False, f"the answer is a number, got {type(answer).__name__}")
    expect(abs(value + 0.5) > 1e-6, "-0.5 is r A, the unclipped term: the min picks the smaller of r A and clip(r) A")
    expect_close(value, -0.8, 1e-6, "the clipped objective")


@exercise("ch03.token_returns", "returns-to-go of a completion with one final reward")
def check_token_returns(token_returns):
    expect(callable(token_returns), f"pass your function itself, not {type(token_returns).__name__}")
    for n, reward, gamma in ((1, 2.0, 0.9), (5, 1.0, 1.0), (7, -0.5, 0.9), (4, 3.0, 0.0)):
        got = token_returns(n, reward, gamma)
        expect(got is not None, "your token_returns returned None: did you forget `return`?")
        got = np.asarray(got, dtype=np.float64)
        want = reward * gamma ** np.arange(n - 1, -1, -1.0)
        expect(got.shape == (n,), f"one return per token: shape ({n},), got {got.shape}")
        expect(not (np.allclose(got, want[::-1]) and not np.allclose(got, want)),
               "reversed: the LAST token is closest to the reward, so it is discounted least")
        expect(np.allclose(got, want), f"wrong for n_tokens={n}, gamma={gamma}: token t is n-1-t steps before the reward")


@exercise("ch03.gae", "generalised advantage estimation")
def check_gae(gae):
    expect(callable(gae), f"pass your function itself, not {type(gae).__name__}")
    rng = np.random.default_rng(0)
    for dones in ([0, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 1, 1]):
        d = np.array(dones, dtype=np.float64)
        r, v, last = rng.normal(size=6), rng.normal(size=6), float(rng.normal())
        for gamma, gae_lambda in ((0.99, 0.95), (0.9, 0.0), (0.8, 1.0)):
            got = gae(r.copy(), v.copy(), d.copy(), last, gamma, gae_lambda)
            expect(got is not None, "your gae returned None: did you forget `return`?")
            got = np.asarray(got, dtype=np.float64)
            want, _ = compute_gae(r, v, d, last, gamma, gae_lambda)
            expect(got.shape == want.shape, f"one advantage per step: shape {want.shape}, got {got.shape}")
            expect(np.allclose(got, want, atol=1e-6),
                   f"wrong with dones={dones}, gamma={gamma}, lambda={gae_lambda}: delta_t = r_t + gamma (1-d_t) V_(t+1) - V_t, "
                   "A_t = delta_t + gamma lambda (1-d_t) A_(t+1), with V_T = last_value")
