"""Worked solutions (and plausible wrong answers) for the chapter 02 exercises."""

import numpy as np


def returns_to_go():
    def rtg(rewards, gamma):
        out, running = np.zeros(len(rewards)), 0.0
        for t in reversed(range(len(rewards))):
            running = rewards[t] + gamma * running
            out[t] = running
        return out

    return rtg


def grad_log_softmax():
    def grad_logp(logits, action):
        p = np.exp(logits - logits.max())
        p /= p.sum()
        return np.eye(len(logits))[action] - p

    return grad_logp


def reinforce_loss():
    def loss(logp, returns, baseline):
        return -(logp * (returns - baseline).detach()).mean()

    return loss


def _forward_cumsum(rewards, gamma):  # sums the past, not the future
    out, running = np.zeros(len(rewards)), 0.0
    for t in range(len(rewards)):
        running = rewards[t] + gamma * running
        out[t] = running
    return out


SOLUTIONS = {
    "ch02.returns_to_go": returns_to_go,
    "ch02.grad_log_softmax": grad_log_softmax,
    "ch02.reinforce_loss": reinforce_loss,
}

WRONG = {
    "ch02.returns_to_go": lambda: _forward_cumsum,
    "ch02.grad_log_softmax": lambda: lambda logits, a: np.exp(logits) / np.exp(logits).sum(),  # forgets onehot
    "ch02.reinforce_loss": lambda: lambda logp, returns, baseline: -(logp * (returns - baseline)).mean(),
}
