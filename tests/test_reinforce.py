"""REINFORCE: returns-to-go, the loss's gradient, a short run beats random, baselines cut variance."""

import numpy as np
import pytest
import torch

from apt_course.reinforce import (
    MLPPolicy,
    ReinforceConfig,
    collect_episodes,
    evaluate_policy,
    gradient_variance,
    reinforce_loss,
    returns_to_go,
    train_reinforce,
)


def test_returns_to_go_by_hand():
    r = np.array([[1.0], [2.0], [3.0]])
    np.testing.assert_allclose(returns_to_go(r, 0.5)[:, 0], [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3])
    np.testing.assert_allclose(returns_to_go(r, 1.0)[:, 0], [6, 5, 3])
    with pytest.raises(ValueError, match="gamma"):
        returns_to_go(r, -0.5)


def test_reinforce_loss_gradient_is_the_policy_gradient():
    logits = torch.tensor([[0.2, -0.1], [0.5, 0.3]], requires_grad=True)
    actions, adv = torch.tensor([0, 1]), torch.tensor([2.0, -1.0])
    logp = torch.log_softmax(logits, -1)[torch.arange(2), actions]
    reinforce_loss(logp, adv).backward()
    p = torch.softmax(logits.detach(), -1)
    onehot = torch.nn.functional.one_hot(actions, 2).float()
    expected = -((onehot - p) * adv[:, None]) / 2  # grad of -(1/N) sum A log pi
    torch.testing.assert_close(logits.grad, expected)


def test_collect_episodes_is_reproducible_and_masked():
    a = collect_episodes(None, 8, seed=3)
    b = collect_episodes(None, 8, seed=3)
    np.testing.assert_array_equal(a.actions, b.actions)
    assert (a.rewards[~a.mask] == 0).all() and a.returns.min() >= 8  # CartPole lasts at least ~8 steps
    np.testing.assert_array_equal(a.returns, a.mask.sum(0))


def test_short_reinforce_run_beats_random():
    torch.set_num_threads(1)
    random_return = evaluate_policy(None, 20)
    policy, hist = train_reinforce(ReinforceConfig(seed=0, iterations=25))
    trained = evaluate_policy(policy, 20)
    assert random_return < 30
    assert trained > 3 * random_return, (random_return, trained, hist.mean_return)


def test_baseline_reduces_gradient_variance():
    torch.manual_seed(0)
    v = gradient_variance(MLPPolicy(), n_episodes=32, seed=0)
    assert v["var_baseline"] < 0.8 * v["var_no_baseline"]


def test_bad_config():
    with pytest.raises(ValueError, match="baseline"):
        ReinforceConfig(baseline="median")
    with pytest.raises(ValueError, match="gamma"):
        ReinforceConfig(gamma=2)
