"""Worked solutions (and plausible wrong answers) for the chapter 01 exercises."""

import numpy as np


def discounted_sum():
    return 1 / (1 - 0.9)  # 1 + 0.9 + 0.81 + ... = 10


def bellman_backup():
    def backup(P, R, gamma, V):
        return (R + gamma * P @ V).max(axis=1)  # P @ V sums over s'

    return backup


def exact_evaluation():
    def evaluate(P, R, gamma, policy):
        S = len(policy)
        P_pi = P[np.arange(S), policy]  # (S, S)
        R_pi = R[np.arange(S), policy]
        return np.linalg.solve(np.eye(S) - gamma * P_pi, R_pi)

    return evaluate


def _two_step_lookahead(P, R, gamma, policy):
    S = len(policy)
    P_pi, R_pi = P[np.arange(S), policy], R[np.arange(S), policy]
    return R_pi + gamma * P_pi @ R_pi


SOLUTIONS = {
    "ch01.discounted_sum": discounted_sum,
    "ch01.bellman_backup": bellman_backup,
    "ch01.exact_evaluation": exact_evaluation,
}

WRONG = {
    "ch01.discounted_sum": lambda: 0.9 / (1 - 0.9),  # forgets the first reward
    "ch01.bellman_backup": lambda: lambda P, R, gamma, V: (R + gamma * P @ V).mean(axis=1),  # average, not max
    "ch01.exact_evaluation": lambda: _two_step_lookahead,  # truncates the infinite sum after two steps

}
