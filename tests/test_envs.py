"""Environments: CartPole matches Gymnasium's CartPole-v1 state for state; gridworld MDP; bad input."""

import numpy as np
import pytest

from apt_course.envs import CartPole, GridWorld, TabularMDP, VecCartPole, cartpole_dynamics

gym = pytest.importorskip("gymnasium")


def _balancer(obs, rng):
    """A decent hand-written controller (so some episodes reach the 500-step limit) with some noise."""
    a = int(obs[2] + 0.5 * obs[3] + 0.05 * obs[1] > 0)
    return a if rng.random() > 0.05 else 1 - a


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_cartpole_matches_gymnasium(seed):
    ours, theirs = CartPole(), gym.make("CartPole-v1")
    o1, _ = ours.reset(seed=seed)
    o2, _ = theirs.reset(seed=seed)
    rng = np.random.default_rng(seed)
    lengths, truncations = [], 0
    for episode in range(4):
        assert np.array_equal(o1, o2) and o1.dtype == o2.dtype == np.float32
        steps = 0
        while True:
            a = int(rng.integers(2)) if episode % 2 else _balancer(o1, rng)
            r1, r2 = ours.step(a), theirs.step(a)
            steps += 1
            assert np.array_equal(r1[0], r2[0]), f"state differs at step {steps} of episode {episode}"
            assert r1[1:4] == r2[1:4]
            o1 = r1[0]
            if r1[2] or r1[3]:
                truncations += r1[3]
                break
        lengths.append(steps)
        o1, _ = ours.reset()  # no seed: both continue their generator
        o2, _ = theirs.reset()
    assert truncations >= 1 and max(lengths) == 500  # the time limit was exercised too


def test_vec_cartpole_dynamics_and_autoreset():
    env = VecCartPole(5, seed=3, max_episode_steps=20)
    obs, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    state = env.state.copy()
    ended = 0
    for _ in range(60):
        actions = rng.integers(0, 2, size=5)
        expected = np.stack([cartpole_dynamics(s, a) for s, a in zip(state, actions)])
        obs, rew, term, trunc, info = env.step(actions)
        done = term | trunc
        np.testing.assert_array_equal(info["final_obs"], expected.astype(np.float32))
        assert np.isfinite(info["episode_return"][done]).all() and np.isnan(info["episode_return"][~done]).all()
        assert (np.abs(obs[done]) <= 0.05).all()  # reset envs start near 0
        ended += done.sum()
        state = env.state.copy()
    assert ended >= 15  # 20-step limit: every env ended at least 3 times


def test_gridworld_is_a_valid_mdp():
    for slip in (0.0, 0.2):
        g = GridWorld(slip=slip)
        np.testing.assert_allclose(g.P.sum(-1), 1.0)
        assert g.terminal.sum() == 2
        for s in np.flatnonzero(g.terminal):
            assert (g.P[s, :, s] == 1).all() and (g.R[s] == 0).all()
    g = GridWorld(layout=("S.G",), step_reward=-0.1)
    obs, _ = g.reset(seed=0)
    assert obs == 0
    _, r, term, trunc, _ = g.step(1)
    assert (r, term) == (pytest.approx(-0.1), False)
    s, r, term, trunc, _ = g.step(1)
    assert term and r == pytest.approx(0.9) and s == 2


def test_slippery_gridworld_samples_from_P():
    g = GridWorld(layout=("...", ".S.", "..."), slip=0.4, max_episode_steps=1)
    counts = np.zeros(g.n_states)
    g.reset(seed=1)
    for _ in range(3000):
        g.reset()
        s, *_ = g.step(0)
        counts[s] += 1
    np.testing.assert_allclose(counts / counts.sum(), g.P[g.start, 0], atol=0.03)


def test_bad_input_is_a_clear_error():
    env = CartPole()
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="out of range"):
        env.step(2)
    with pytest.raises(ValueError, match="integer"):
        env.step(0.5)
    done = False
    while not done:
        *_, term, trunc, _ = env.step(1)
        done = term or trunc
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(0)
    g = GridWorld()
    g.reset(seed=0)
    with pytest.raises(ValueError, match="out of range"):
        g.step(4)
    for gamma in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
            GridWorld(gamma=gamma)
    with pytest.raises(ValueError, match="probability distribution"):
        TabularMDP(np.ones((2, 1, 2)), np.zeros((2, 1)), 0.9)
    v = VecCartPole(3)
    v.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        v.step(np.zeros(2, dtype=int))
