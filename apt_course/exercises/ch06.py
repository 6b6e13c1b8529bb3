"""Chapter 06 exercises: the KL-shaped per-token reward, GAE over tokens, the clipped value loss, RLOO's
leave-one-out advantages."""

from __future__ import annotations

import torch

from ..ppo import ppo_value_loss
from ..rlhf import kl_shaped_rewards, rloo_advantages, token_gae
from . import ExerciseFailed, _grading, exercise, expect


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


# ---------------------------------------------------------------- build: one PPO minibatch step of RLHF

def _ppo_rollout():
    """A policy with a value head, a sampled rollout (8 completions, varied lengths) and everything the rollout
    phase computed: old log-probs and values (perturbed from the current ones, so the ratio and the value clip
    both bite), advantages and returns."""
    from ..lm import sample_groups
    from ..rlhf import PolicyWithValue, _forward

    tok = _grading.tokenizer()
    policy = PolicyWithValue(_grading.tiny_lm(seed=6))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        policy.value_head.weight.normal_(0, 0.3, generator=g)  # the head starts at zero; a non-zero one is a test
    torch.manual_seed(6)
    batch = sample_groups(policy.lm, tok, ["<|user|>add 1 2<|assistant|>", "<|user|>hi, i am bob<|assistant|>"], 4, 6)
    batch = {k: v for k, v in batch.items() if torch.is_tensor(v) and k != "truncated"}
    B, T = batch["completion_ids"].shape
    batch["completion_mask"] = (torch.arange(T)[None] < torch.tensor([1, 2, 3, 4, 5, 6, 6, 3])[:, None]).long()
    mask = batch["completion_mask"].float()
    with torch.no_grad():
        logp, values = _forward(policy, batch, 1.0)
    batch["old_logp"] = (logp + 0.3 * torch.randn(B, T, generator=g)) * mask
    batch["old_values"] = (values + 0.5 * torch.randn(B, T, generator=g)) * mask
    batch["advantages"] = torch.randn(B, T, generator=g) * mask
    batch["returns"] = torch.randn(B, T, generator=g) * mask
    return policy, batch


@exercise("ch06.ppo_step", "One PPO step of RLHF: the clipped policy loss plus the clipped value loss on completion tokens")
@_grading.own_rng
def check_ppo_step(fn):
    from ..ppo import ppo_policy_loss
    from ..rlhf import _forward

    expect(callable(fn), "answer with a function ppo_step(policy, batch, epsilon, clip_value, vf_coef) -> loss")
    policy, batch = _ppo_rollout()
    eps, clip, vf = 0.2, 0.2, 0.5
    got, got_grads = _grading.loss_and_grads(fn(policy, {k: v.clone() for k, v in batch.items()}, eps, clip, vf),
                                             policy, "ppo_step")
    logp, values = _forward(policy, batch, 1.0)  # train_rlhf's own minibatch loss
    m = batch["completion_mask"].bool()
    old, old_v, adv, ret = (batch[k] for k in ("old_logp", "old_values", "advantages", "returns"))
    pg = ppo_policy_loss(logp[m], old[m], adv[m], eps)
    want, want_grads = _grading.loss_and_grads(pg + vf * ppo_value_loss(values[m], old_v[m], ret[m], clip), policy,
                                               "the package's PPO loss")
    with torch.no_grad():
        logp, values, pg = logp.detach(), values.detach(), pg.detach()
        ratio = torch.exp(logp - old)
        P = batch["prompt_ids"].size(1)
        full_values = policy(torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
                             torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1))[1]
        unshifted = full_values[:, P:]
        vl = ppo_value_loss(values[m], old_v[m], ret[m], clip)
        wrong = {
            "the value loss is missing: PPO trains the value head in the same step, loss = policy loss + vf_coef * "
            "value loss": pg,
            "the policy loss is not clipped: take the min of ratio * A and clip(ratio, 1 - eps, 1 + eps) * A":
                -(ratio * adv)[m].mean() + vf * vl,
            "the sign of the policy loss: it is -min(ratio * A, clip(ratio) * A), minimised": -pg + vf * vl,
            "the value loss is the plain MSE: take the max with the loss of the clipped value "
            "(old_values + clip(V - old_values, -c, c))": pg + vf * ppo_value_loss(values[m], old_v[m], ret[m], None),
            "padding is averaged in: the losses are means over the completion tokens only (completion_mask)":
                ppo_policy_loss(logp, old, adv, eps) + vf * ppo_value_loss(values, old_v, ret, clip),
            "the values are one position late: V(state before completion token t) is read at position P - 1 + t "
            "of the joined sequence (the same shift as the log-probs): values[:, P - 1:-1]":
                pg + vf * ppo_value_loss(unshifted[m], old_v[m], ret[m], clip),
        }
    formula = ("-mean_t min(ratio A, clip(ratio, 1-eps, 1+eps) A) + vf_coef * 0.5 mean_t max((V - R)^2, (V_clipped - "
               "R)^2), over completion tokens")
    _grading.compare(got, want, wrong, formula)
    _grading.compare_grads(got_grads, want_grads)


@exercise("ch06.predict_beta0", "Predict, then run: drop the KL leash (beta = 0)")
def check_predict_beta0(answer):
    _grading.prediction(answer, "b", ("a", "b", "c", "d"),
                        "nothing pulls the policy back to the reference any more, and the RM rewards friendly words whatever "
                        "else the reply says: where does the policy go, and what happens to the replies the RM does not check? "
                        "Section 5 ran it",
                        "(b): at seeds 0-4 (tiny profile, benchmarks/results/seed_sweep.md) the final KL was 15.9-31.6 "
                        "nats per reply with beta = 0 against 2.9-5.2 with the leash, and the held-out ground truth "
                        "ended at 0.13-0.55 against 0.52-0.72, lower at every seed: the RM score held while the "
                        "behaviour it stands for decayed (reward-model over-optimisation).")
