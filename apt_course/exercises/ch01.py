"""Chapter 01 exercises: discounting, the Bellman optimality backup, exact policy evaluation."""

from __future__ import annotations

import numpy as np

from ..envs import GridWorld, TabularMDP
from ..mdp import solve_policy_exact, two_state_mdp
from . import exercise, expect, expect_close


def _test_mdps() -> list[TabularMDP]:
    rng = np.random.default_rng(0)
    P = rng.random((5, 3, 5)) ** 3
    P /= P.sum(-1, keepdims=True)
    return [two_state_mdp(0.9), GridWorld(slip=0.2, gamma=0.95), TabularMDP(P, rng.normal(size=(5, 3)), 0.8)]


def _call(fn, *args, what: str) -> np.ndarray:
    expect(callable(fn), f"pass your function itself (e.g. `{what}`), not {type(fn).__name__}")
    out = fn(*args)
    expect(out is not None, f"your {what} returned None: did you forget `return`?")
    return np.asarray(out, dtype=np.float64)


@exercise("ch01.discounted_sum", "discounted sum of a constant reward")
def check_discounted_sum(answer):
    expect(answer is not None, "replace None by your number: sum_k gamma^k * 1 for gamma = 0.9")
    try:
        value = float(answer)
    except (TypeError, ValueError):
        expect(False, f"the answer is a number, got {type(answer).__name__}")
    expect(abs(value - 0.9 / (1 - 0.9)) > 1e-6, "that is sum_{k>=1}: the first reward (k = 0) counts too")
    expect_close(value, 1 / (1 - 0.9), 1e-6, "the return")


@exercise("ch01.bellman_backup", "one Bellman optimality backup")
def check_bellman_backup(backup):
    rng = np.random.default_rng(1)
    for mdp in _test_mdps():
        V = rng.normal(size=mdp.n_states)
        got = _call(backup, mdp.P, mdp.R, mdp.gamma, V.copy(), what="backup")
        want = (mdp.R + mdp.gamma * mdp.P @ V).max(1)
        expect(got.shape == want.shape, f"the new V must have shape {want.shape} (one value per state), got {got.shape}")
        mean_q = (mdp.R + mdp.gamma * mdp.P @ V).mean(1)
        expect(not np.allclose(got, mean_q) or np.allclose(mean_q, want),
               "that averages over actions (the expectation equation for a uniform policy); take the max")
        expect(np.allclose(got, want, atol=1e-8),
               "V_new(s) = max_a [R(s,a) + gamma * sum_s' P(s,a,s') V(s')]; check the axes of your sum and max")


@exercise("ch01.exact_evaluation", "exact policy evaluation by a linear solve")
def check_exact_evaluation(evaluate):
    rng = np.random.default_rng(2)
    for mdp in _test_mdps()[::2] + [GridWorld(slip=0.2, gamma=0.9)]:
        policy = rng.integers(0, mdp.n_actions, size=mdp.n_states)
        got = _call(evaluate, mdp.P, mdp.R, mdp.gamma, policy, what="evaluate")
        want = solve_policy_exact(mdp, policy)
        expect(got.shape == want.shape, f"V must have shape {want.shape}, got {got.shape}")
        expect(np.allclose(got, want, atol=1e-6),
               "solve (I - gamma P_pi) V = R_pi with P_pi[s] = P[s, pi(s)] and R_pi[s] = R[s, pi(s)]")
