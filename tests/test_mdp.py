"""Dynamic programming: value iteration against closed forms and the exact linear solve."""

import numpy as np
import pytest

from apt_course.envs import GridWorld, TabularMDP
from apt_course.mdp import (
    greedy_policy,
    policy_evaluation,
    policy_iteration,
    solve_policy_exact,
    two_state_mdp,
    value_iteration,
)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.9])
def test_value_iteration_two_state_closed_form(gamma):
    mdp = two_state_mdp(gamma)
    res = value_iteration(mdp)
    v1 = 2 / (1 - gamma)
    v0 = max(1 / (1 - gamma), gamma * v1)
    np.testing.assert_allclose(res.V, [v0, v1], atol=1e-8)
    assert res.policy[1] == 0  # stay in the rewarding state
    assert res.policy[0] == (1 if gamma * v1 > 1 / (1 - gamma) else 0)


def test_value_iteration_contracts_by_gamma():
    res = value_iteration(two_state_mdp(0.9))
    d = np.array(res.deltas)
    assert (d[1:] <= 0.9 * d[:-1] + 1e-12).all()


@pytest.mark.parametrize("slip", [0.0, 0.2])
def test_gridworld_vi_equals_linear_solve_and_pi(slip):
    g = GridWorld(slip=slip, gamma=0.95)
    vi = value_iteration(g)
    exact = solve_policy_exact(g, vi.policy)
    np.testing.assert_allclose(vi.V, exact, atol=1e-8)
    pi = policy_iteration(g)
    np.testing.assert_allclose(pi.V, vi.V, atol=1e-8)
    np.testing.assert_allclose(policy_evaluation(g, pi.policy), exact, atol=1e-8)
    assert pi.iterations <= vi.sweeps
    assert vi.V[g.start] > 0  # the goal is reachable and worth more than its path cost


def test_stochastic_policy_evaluation():
    g = GridWorld(layout=("S..G",), gamma=0.9)
    uniform = np.full((g.n_states, g.n_actions), 0.25)
    np.testing.assert_allclose(policy_evaluation(g, uniform), solve_policy_exact(g, uniform), atol=1e-8)
    best = greedy_policy(g, value_iteration(g).V)
    assert (best[:3] == 1).all()  # always right


def test_gamma_one_with_termination():
    g = GridWorld(layout=("S..G",), gamma=1.0, step_reward=-1.0, goal_reward=0.0)
    vi = value_iteration(g)
    np.testing.assert_allclose(vi.V[:3], [-3, -2, -1])
    np.testing.assert_allclose(solve_policy_exact(g, vi.policy)[:3], [-3, -2, -1])


def test_bad_input():
    with pytest.raises(ValueError, match="gamma"):
        two_state_mdp(1.2)
    with pytest.raises(ValueError, match="shape"):
        TabularMDP(np.ones((2, 2, 3)) / 3, np.zeros((2, 2)), 0.9)
    g = GridWorld()
    with pytest.raises(ValueError, match="policy"):
        solve_policy_exact(g, np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="actions in"):
        solve_policy_exact(g, np.full(g.n_states, 7))
