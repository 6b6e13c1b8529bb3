"""Worked solutions of chapter 06's exercises (and one wrong answer each, to prove the checkers fail)."""

import torch


def kl_rewards(scores, logp, ref_logp, mask, beta):
    mask = mask.float()
    rewards = -beta * (logp - ref_logp) * mask               # the KL leash on every completion token
    last = mask.sum(1).long() - 1                            # each row's last real token
    rewards[torch.arange(len(scores)), last] += scores       # the RM score arrives at the end
    return rewards


def gae(rewards, values, mask, gae_lambda):
    mask = mask.float()
    B, T = rewards.shape
    adv = torch.zeros(B, T)
    next_adv, next_value = torch.zeros(B), torch.zeros(B)
    for t in reversed(range(T)):                             # gamma = 1; padding resets the recursion to 0
        delta = rewards[:, t] + next_value - values[:, t]
        adv[:, t] = (delta + gae_lambda * next_adv) * mask[:, t]
        next_adv, next_value = adv[:, t], values[:, t] * mask[:, t]
    return adv


def value_loss(new_values, old_values, returns, clip):
    clipped = old_values + torch.clamp(new_values - old_values, -clip, clip)
    return 0.5 * torch.max((new_values - returns) ** 2, (clipped - returns) ** 2).mean()


def rloo(rewards, k):
    groups = rewards.view(-1, k)
    baselines = (groups.sum(1, keepdim=True) - groups) / (k - 1)   # the mean of the k - 1 OTHER replies
    return (groups - baselines).flatten()


def _score_on_last_column(scores, logp, ref_logp, mask, beta):
    rewards = -beta * (logp - ref_logp) * mask.float()
    rewards[:, -1] += scores
    return rewards


SOLUTIONS = {
    "ch06.kl_rewards": lambda: kl_rewards,
    "ch06.token_gae": lambda: gae,
    "ch06.value_loss": lambda: value_loss,
    "ch06.rloo_advantages": lambda: rloo,
}
WRONG = {
    "ch06.kl_rewards": lambda: _score_on_last_column,
    "ch06.token_gae": lambda: (lambda rewards, values, mask, gae_lambda: (rewards - values) * mask),
    "ch06.value_loss": lambda: (lambda new, old, ret, clip: 0.5 * ((new - ret) ** 2).mean()),
    "ch06.rloo_advantages": lambda: (lambda r, k: r - r.view(-1, k).mean(1).repeat_interleave(k)),
}
