"""The derivations in the chapters' markdown, checked on numbers against the package functions that use them.

Each test names the chapter whose derivation it checks. Distributions are small and enumerated exactly, so every
expectation is a finite sum and every check is an equality, not a Monte-Carlo tolerance.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F

from apt_course.dpo import dpo_loss
from apt_course.grpo import kl_k3
from apt_course.ppo import approx_kl, clip_fraction, ppo_value_loss
from apt_course.reinforce import reinforce_loss, returns_to_go

F64 = torch.float64  # every tensor here: exact sums, tight comparisons


def randn(*shape, g):
    return torch.randn(*shape, generator=g, dtype=F64)


def test_ch02_log_derivative_trick_on_a_categorical():
    """grad E_{a~p_theta}[f(a)] = E[f(a) grad log p_theta(a)] for p_theta = softmax(theta), both sides by autograd; a
    constant baseline b leaves it unchanged (E[grad log p] = 0); reinforce_loss's gradient is the same sum."""
    g = torch.Generator().manual_seed(0)
    theta = randn(5, g=g).requires_grad_(True)
    f = randn(5, g=g)
    p = torch.softmax(theta, 0)
    (direct,) = torch.autograd.grad((p * f).sum(), theta)
    logp = torch.log_softmax(theta, 0)
    jac = torch.stack([torch.autograd.grad(logp[a], theta, retain_graph=True)[0] for a in range(5)])  # grad log p(a)
    pw = p.detach()[:, None]
    torch.testing.assert_close((pw * f[:, None] * jac).sum(0), direct)
    torch.testing.assert_close((pw * (f - 3.0)[:, None] * jac).sum(0), direct)  # a baseline b = 3
    torch.testing.assert_close((pw * jac).sum(0), torch.zeros(5, dtype=F64), atol=1e-12, rtol=0)
    # reinforce_loss = -mean(log p(a) A(a)); with A(a) = n p(a) f(a) over all n actions its -gradient is E[f grad log p]
    (surrogate,) = torch.autograd.grad(reinforce_loss(logp, 5 * p * f), theta)
    torch.testing.assert_close(-surrogate, direct)


def _two_step_trajectories(theta, rewards):
    """Every trajectory of a 2-step episode whose state-independent policy is softmax(theta) over 3 actions and whose
    reward at a step is rewards[action]: (probabilities, log pi of each step's action, each step's reward)."""
    logpi = torch.log_softmax(theta, 0)
    taus = list(itertools.product(range(3), repeat=2))
    logp = torch.stack([logpi[list(tau)] for tau in taus])  # (9, 2)
    return logp.sum(1).exp(), logp, torch.stack([rewards[list(tau)] for tau in taus])


def test_ch02_reward_to_go_estimator_and_the_discount():
    """Chapter 02: with returns-to-go G_t (returns_to_go) and a factor gamma^t on step t, the REINFORCE estimate is
    exactly the gradient of the discounted objective J_gamma = E[sum_t gamma^t r_t]; without gamma^t (what the course
    and most implementations do) it is not, unless gamma = 1, where it is the gradient of the undiscounted J."""
    g = torch.Generator().manual_seed(1)
    theta, rewards = randn(3, g=g).requires_grad_(True), randn(3, g=g)
    for gamma in (0.5, 1.0):
        prob, logp, r = _two_step_trajectories(theta, rewards)
        weights = torch.tensor([1.0, gamma], dtype=F64)
        (exact,) = torch.autograd.grad((prob * (r * weights).sum(1)).sum(), theta, retain_graph=True)  # grad J_gamma
        G = torch.as_tensor(returns_to_go(r.detach().T.numpy(), gamma)).T  # (9, 2), time on axis 0 for the package
        n = logp.numel()
        for discount_t, should_match in ((weights, True), (torch.ones(2, dtype=F64), gamma == 1.0)):
            adv = n * prob.detach()[:, None] * discount_t * G  # mean over n entries, weighted by p(tau): E[...]
            (grad,) = torch.autograd.grad(reinforce_loss(logp, adv), theta, retain_graph=True)
            assert torch.allclose(-grad, exact) == should_match, (gamma, discount_t)


def test_ch03_approx_kl_is_k3_and_estimates_kl_old_new():
    """Chapter 03: PPO's approx KL, (r - 1) - log r with r = pi_new / pi_old on actions sampled from pi_old, is k3:
    never negative, and its expectation under pi_old is exactly KL(pi_old || pi_new). It is grpo.kl_k3 with the
    sampling policy first (chapter 09's penalty), as chapter 06 writes it."""
    g = torch.Generator().manual_seed(2)
    old, new = torch.log_softmax(randn(7, g=g), 0), torch.log_softmax(randn(7, g=g), 0)
    log_r = new - old
    approx = (log_r.exp() - 1) - log_r  # per sample; train_ppo and train_rlhf_ppo log its mean (ppo.approx_kl)
    torch.testing.assert_close(approx, kl_k3(old, new))
    assert (approx >= 0).all()
    torch.testing.assert_close((old.exp() * approx).sum(), F.kl_div(new, old, log_target=True, reduction="sum"))
    assert approx_kl(log_r) == pytest.approx(approx.mean().item())
    assert clip_fraction(torch.log(torch.tensor([0.7, 0.9, 1.0, 1.1, 1.3])), 0.2) == pytest.approx(0.4)


def test_ch03_clipped_value_loss_is_the_written_formula():
    """Chapter 03's L^V = 1/2 E[max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)] equals ppo_value_loss, and its
    gradient is zero where the clipped term is the larger: a step cannot move V more than c past V_old towards R."""
    g = torch.Generator().manual_seed(3)
    v = randn(50, g=g).requires_grad_(True)
    v_old, ret, c = randn(50, g=g), randn(50, g=g), 0.2
    clipped = (v_old + (v - v_old).clamp(-c, c) - ret) ** 2
    unclipped = (v - ret) ** 2
    written = 0.5 * torch.maximum(unclipped, clipped).mean()
    loss = ppo_value_loss(v, v_old, ret, c)
    torch.testing.assert_close(loss, written)
    (grad,) = torch.autograd.grad(loss, v)
    frozen = (clipped > unclipped) & ((v - v_old).abs() > c)
    assert frozen.any() and (grad[frozen] == 0).all() and (grad[~frozen] != 0).all()


def test_ch06_kl_shaped_rewards_return_the_kl_regularised_objective():
    """Chapter 06: summing kl_shaped_rewards over a reply gives RM(x, y) - beta sum_t k1_t, and its expectation over
    every reply y ~ pi (2 tokens from a vocabulary of 3, each token depending on the one before) is exactly
    E[RM] - beta KL(pi(y|x) || pi_ref(y|x)) of whole replies: the objective J, with k1 unbiased though some k1 < 0."""
    from apt_course.rlhf import kl_shaped_rewards

    g = torch.Generator().manual_seed(4)

    def policy():  # first-token logits, and next-token logits given the first token
        return torch.log_softmax(randn(3, g=g), 0), torch.log_softmax(randn(3, 3, g=g), 1)

    (pi0, pi1), (ref0, ref1) = policy(), policy()
    replies = list(itertools.product(range(3), repeat=2))
    logp = torch.stack([torch.stack([pi0[a], pi1[a, b]]) for a, b in replies])
    ref_logp = torch.stack([torch.stack([ref0[a], ref1[a, b]]) for a, b in replies])
    scores, beta = randn(len(replies), g=g), 0.3
    shaped = kl_shaped_rewards(scores, logp, ref_logp, torch.ones_like(logp), beta).sum(1)
    prob, prob_ref = logp.sum(1).exp(), ref_logp.sum(1).exp()
    kl_replies = (prob * (prob / prob_ref).log()).sum()
    torch.testing.assert_close((prob * shaped).sum(), (prob * scores).sum() - beta * kl_replies)
    assert (logp - ref_logp).min() < 0 < kl_replies


def test_ch07_partition_function_cancels_dpo_at_the_optimum_is_bradley_terry():
    """Chapter 07: with pi* = pi_ref e^(r/beta) / Z(x), a different Z for each prompt, dpo_loss on pi*'s log-probs is
    the Bradley-Terry loss -log sigma(r(x, y_w) - r(x, y_l)) on the reward itself: Z(x) cancels."""
    g = torch.Generator().manual_seed(5)
    n_prompts, n_replies, beta = 4, 6, 0.25
    ref = torch.log_softmax(randn(n_prompts, n_replies, g=g), 1)
    r = 3 * randn(n_prompts, n_replies, g=g)
    log_z = torch.logsumexp(ref + r / beta, 1, keepdim=True)  # differs from prompt to prompt
    opt = ref + r / beta - log_z  # log pi*
    torch.testing.assert_close(opt.exp().sum(1), torch.ones(n_prompts, dtype=F64))
    torch.testing.assert_close(r, beta * (opt - ref) + beta * log_z)  # the implicit reward, Z included
    w, lose = torch.tensor([0, 2, 5, 1]), torch.tensor([3, 1, 0, 4])  # one pair (y_w, y_l) per prompt
    rows = torch.arange(n_prompts)
    loss, _, _ = dpo_loss(opt[rows, w], opt[rows, lose], ref[rows, w], ref[rows, lose], beta)
    torch.testing.assert_close(loss, -F.logsigmoid(r[rows, w] - r[rows, lose]).mean())
