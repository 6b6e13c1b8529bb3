"""PPO: GAE by hand, the clipped surrogate against its formula, value loss, a short training run."""

import math

import numpy as np
import pytest
import torch

from apt_course.ppo import (
    PPOConfig,
    compute_gae,
    explained_variance,
    ppo_policy_loss,
    ppo_value_loss,
    train_ppo,
)


def test_gae_by_hand_without_termination():
    r, v, d = [1.0, 0.0, 2.0], [0.5, 1.0, 1.5], [0, 0, 0]
    g, lam, last = 0.9, 0.8, 2.0
    d2 = 2.0 + g * last - 1.5  # 2.3
    d1 = 0.0 + g * 1.5 - 1.0  # 0.35
    d0 = 1.0 + g * 1.0 - 0.5  # 1.4
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = compute_gae(r, v, d, last, g, lam)
    np.testing.assert_allclose(adv, [a0, a1, a2])
    np.testing.assert_allclose(ret, np.array([a0, a1, a2]) + v)


def test_gae_by_hand_with_termination():
    # the episode terminates after step 1; step 2 starts a new episode
    r, v, d = [1.0, 1.0, 1.0], [2.0, 1.0, 3.0], [0, 1, 0]
    g, lam, last = 0.5, 0.5, 4.0
    a2 = 1.0 + g * 4.0 - 3.0  # 0.0
    a1 = 1.0 - 1.0  # terminal: no bootstrap, nothing flows back from step 2
    a0 = (1.0 + g * 1.0 - 2.0) + g * lam * a1
    adv, _ = compute_gae(r, v, d, last, g, lam)
    np.testing.assert_allclose(adv, [a0, a1, a2])


def test_gae_lambda_one_is_monte_carlo_and_batched():
    rng = np.random.default_rng(0)
    r, v = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    d = np.zeros((6, 3))
    adv, ret = compute_gae(r, v, d, np.zeros(3), 0.9, 1.0)
    mc = np.array([[sum(0.9**k * r[t + k, j] for k in range(6 - t)) for j in range(3)] for t in range(6)])
    np.testing.assert_allclose(ret, mc)
    adv0, _ = compute_gae(r, v, d, np.zeros(3), 0.9, 0.0)  # lambda 0: one-step TD error
    td = r + 0.9 * np.vstack([v[1:], np.zeros((1, 3))]) - v
    np.testing.assert_allclose(adv0, td)


def test_ppo_policy_loss_matches_formula_including_clip():
    eps = 0.2
    # every case of the clip (old logp = 0, so the ratio r = exp(new)):
    #   r=1.5, A=+2: above 1+eps, helping   -> clipped:   1.2*2 = 2.4, no gradient
    #   r=0.5, A=-1: below 1-eps, helping   -> clipped:   0.8*-1 = -0.8, no gradient
    #   r=1.1, A=+1: inside [0.8, 1.2]      -> r A = 1.1
    #   r=0.7, A=+3: below 1-eps, hurting   -> unclipped (pessimistic): 0.7*3 = 2.1
    #   r=1.4, A=-2: above 1+eps, hurting   -> unclipped (pessimistic): 1.4*-2 = -2.8
    new = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7, 1.4]))
    old = torch.zeros(5)
    adv = torch.tensor([2.0, -1.0, 1.0, 3.0, -2.0])
    expected = -(2.4 - 0.8 + 1.1 + 2.1 - 2.8) / 5
    loss = ppo_policy_loss(new, old, adv, eps)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # the gradient flows only through the unclipped terms: d(-r A / n)/d log r = -r A / n
    new = new.clone().requires_grad_(True)
    ppo_policy_loss(new, old, adv, eps).backward()
    r = torch.exp(new.detach())
    np.testing.assert_allclose(new.grad.numpy(), [0, 0, -r[2] * 1.0 / 5, -r[3] * 3.0 / 5, -r[4] * -2.0 / 5],
                               atol=1e-6)


def test_value_loss_clipped_and_plain():
    new, old, ret = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.1]), torch.tensor([3.0, 0.0])
    # sample 1: unclipped (2-3)^2 = 1; clipped V = 1.2 -> (1.2-3)^2 = 3.24 -> max 3.24; sample 2: 0 vs (0.1-0.1... )
    c2 = (0.1 + max(-0.2, min(0.2, -0.1)) - 0.0) ** 2  # = 0
    assert ppo_value_loss(new, old, ret, 0.2).item() == pytest.approx(0.5 * (3.24 + max(0.0, c2)) / 2)
    assert ppo_value_loss(new, old, ret, None).item() == pytest.approx(0.5 * (1.0 + 0.0) / 2)


def test_explained_variance():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(y, y) == 1.0
    assert explained_variance(np.full(4, y.mean()), y) == pytest.approx(0.0)
    assert math.isnan(explained_variance(y, np.ones(4)))


def test_short_ppo_run_learns():
    torch.set_num_threads(1)
    cfg = PPOConfig(seed=0, total_steps=16_384, num_envs=8, num_steps=128)
    _, hist = train_ppo(config=cfg)
    assert len(hist.step) == cfg.num_updates and hist.step[-1] == 16_384
    first, last = hist.episode_return[0], np.nanmean(hist.episode_return[-3:])
    assert last > 2.5 * first, hist.episode_return
    for key in ("approx_kl", "clip_fraction", "entropy", "explained_variance"):
        assert np.isfinite(getattr(hist, key)).all()


def test_bad_config():
    with pytest.raises(ValueError, match="gamma"):
        PPOConfig(gamma=1.01)
    with pytest.raises(ValueError, match="divisible"):
        PPOConfig(num_envs=3, num_steps=5, num_minibatches=4)
    with pytest.raises(ValueError, match="lam"):
        compute_gae([1.0], [0.0], [0], 0.0, 0.9, 1.5)
