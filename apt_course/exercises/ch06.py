"""Chapter 06 exercises: the KL-shaped per-token reward, GAE over tokens, the clipped value loss, RLOO's
leave-one-out advantages."""

from __future__ import annotations

import torch

from ..ppo import ppo_value_loss
from ..rlhf import kl_shaped_rewards, rloo_advantages, token_gae
from . import ExerciseFailed, exercise, expect


def _batch():
    g = torch.Generator().manual_seed(6)
    logp, ref = -torch.rand(3, 5, generator=g) * 3, -torch.rand(3, 5, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    return logp, ref, mask, torch.tensor([2.0, -1.0, 0.5])


@exercise("ch06.kl_rewards", "Per-token rewards: -beta * (log pi - log pi_ref), plus the RM score on the last token")
def check_kl_rewards(fn):
    expect(callable(fn), "answer with a function rewards(scores, logp, ref_logp, mask, beta) -> (B, T) tensor")
    logp, ref, mask, scores = _batch()
    got = fn(scores, logp, ref, mask, 0.1)
    expect(torch.is_tensor(got) and got.shape == logp.shape, f"return shape {tuple(logp.shape)}")
    want = kl_shaped_rewards(scores, logp, ref, mask, 0.1)
    wrong_end = want.clone()
    wrong_end[torch.arange(3), mask.sum(1) - 1] -= scores
    wrong_end[:, -1] += scores
    if torch.allclose(got, wrong_end, atol=1e-5):
        raise ExerciseFailed("the score goes on each row's LAST REAL token (mask.sum(1) - 1), not on position -1")
    expect(torch.allclose(got * (1 - mask), torch.zeros_like(got)), "padding positions (mask = 0) must get 0")
    expect(torch.allclose(got, want, atol=1e-5), f"got {got.tolist()}, expected {want.tolist()}: check the sign "
           "of the KL term (a policy that moves away from the reference pays, -beta * (logp - ref_logp))")


@exercise("ch06.token_gae", "GAE over completion tokens (gamma = 1), nothing bootstrapped past the last token")
def check_token_gae(fn):
    expect(callable(fn), "answer with a function gae(rewards, values, mask, gae_lambda) -> advantages (B, T)")
    logp, ref, mask, scores = _batch()
    rewards = kl_shaped_rewards(scores, logp, ref, mask, 0.1)
    values = torch.randn(3, 5, generator=torch.Generator().manual_seed(7))
    got = fn(rewards, values, mask, 0.9)
    want, _ = token_gae(rewards, values, mask, gae_lambda=0.9)
    expect(torch.is_tensor(got) and got.shape == want.shape, f"return advantages of shape {tuple(want.shape)}")
    expect(torch.allclose(got * (1 - mask), torch.zeros_like(got), atol=1e-6), "padding positions must get 0")
    expect(torch.allclose(got, want, atol=1e-5), f"got {got.tolist()}, expected {want.tolist()}: "
           "delta_t = r_t + V_{t+1} - V_t with V after the last real token = 0, A_t = delta_t + lambda A_{t+1}")


@exercise("ch06.value_loss", "The clipped value loss")
def check_value_loss(fn):
    expect(callable(fn), "answer with a function loss(new_values, old_values, returns, clip) -> scalar tensor")
    g = torch.Generator().manual_seed(8)
    new, old, ret = torch.randn(20, generator=g), torch.randn(20, generator=g), torch.randn(20, generator=g) * 2
    got = fn(new, old, ret, 0.2)
    expect(torch.is_tensor(got) and got.dim() == 0, "return a scalar tensor")
    want = ppo_value_loss(new, old, ret, 0.2)
    if torch.allclose(got, ppo_value_loss(new, old, ret, None), atol=1e-6):
        raise ExerciseFailed("that is the plain MSE: take the max with the loss of the clipped value")
    expect(torch.allclose(got, want, atol=1e-5), f"got {got.item():.4f}, expected {want.item():.4f}: "
           "0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2))")


@exercise("ch06.rloo_advantages", "RLOO: each reply's reward minus the mean reward of the other replies to its prompt")
def check_rloo_advantages(fn):
    expect(callable(fn), "answer with a function advantages(rewards, k) -> tensor (N,), rewards prompt by prompt")
    rewards = torch.tensor([1.0, 2.0, 6.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    got = fn(rewards, 4)
    want = rloo_advantages(rewards, None, 4, normalize=False)
    expect(torch.is_tensor(got) and got.shape == want.shape, f"return a tensor of shape {tuple(want.shape)}")
    if torch.allclose(got, rewards - rewards.view(-1, 4).mean(1).repeat_interleave(4), atol=1e-6):
        raise ExerciseFailed("that baseline is the group mean, which includes the reply itself (GRPO's): "
                             "leave the reply out, mean over the k - 1 others")
    expect(torch.allclose(got, want, atol=1e-5), f"got {got.tolist()}, expected {want.tolist()}: "
           "A_i = r_i - (sum of the group - r_i) / (k - 1)")
