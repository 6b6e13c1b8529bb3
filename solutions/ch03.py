"""Worked solutions (and plausible wrong answers) for the chapter 03 exercises."""

import numpy as np


def clipped_objective():
    r, A, eps = 0.5, -1.0, 0.2
    return min(r * A, float(np.clip(r, 1 - eps, 1 + eps)) * A)  # min(-0.5, -0.8) = -0.8


def token_returns():
    def fn(n_tokens, reward, gamma):
        return reward * gamma ** np.arange(n_tokens - 1, -1, -1.0)  # the last token gets reward, the first gamma^(n-1) reward

    return fn


def gae():
    def fn(rewards, values, dones, last_value, gamma, gae_lambda):
        adv, next_adv, next_value = np.zeros(len(rewards)), 0.0, last_value
        for t in reversed(range(len(rewards))):
            nonterminal = 1.0 - dones[t]
            delta = rewards[t] + gamma * nonterminal * next_value - values[t]
            next_adv = delta + gamma * gae_lambda * nonterminal * next_adv
            adv[t] = next_adv
            next_value = values[t]
        return adv

    return fn


def _gae_ignoring_dones(rewards, values, dones, last_value, gamma, gae_lambda):
    return gae()(rewards, values, np.zeros_like(dones), last_value, gamma, gae_lambda)


SOLUTIONS = {
    "ch03.clipped_objective": clipped_objective,
    "ch03.token_returns": token_returns,
    "ch03.gae": gae,
}

WRONG = {
    "ch03.clipped_objective": lambda: -0.5,  # the unclipped term
    "ch03.token_returns": lambda: lambda n, reward, gamma: reward * gamma ** np.arange(n, dtype=float),  # reversed
    "ch03.gae": lambda: _gae_ignoring_dones,  # bootstraps across episode ends
}
