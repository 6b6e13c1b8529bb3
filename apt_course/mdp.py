"""Chapter 01: Markov decision processes solved exactly (dynamic programming).

An MDP here is a :class:`apt_course.envs.TabularMDP` (``P[s, a, s']``, ``R[s, a]``, ``gamma``), e.g. the
:class:`apt_course.envs.GridWorld`. A policy is either deterministic (an int array ``pi[s]``) or stochastic
(an array ``pi[s, a]`` of probabilities); :func:`as_stochastic` turns the first into the second.

Bellman expectation:  V_pi(s) = sum_a pi(a|s) [R(s,a) + gamma sum_s' P(s'|s,a) V_pi(s')]
Bellman optimality:   V*(s)   = max_a       [R(s,a) + gamma sum_s' P(s'|s,a) V*(s')]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .envs import TabularMDP, check_discount


def as_stochastic(mdp: TabularMDP, policy) -> np.ndarray:
    """A policy as an (S, A) matrix of probabilities (a deterministic int policy becomes one-hot rows)."""
    policy = np.asarray(policy)
    S, A = mdp.n_states, mdp.n_actions
    if policy.shape == (S,):
        if not np.issubdtype(policy.dtype, np.integer) or (policy < 0).any() or (policy >= A).any():
            raise ValueError(f"a deterministic policy must hold actions in 0..{A - 1} for each of the {S} states")
        return np.eye(A)[policy]
    if policy.shape == (S, A):
        if (policy < 0).any() or not np.allclose(policy.sum(1), 1.0):
            raise ValueError("each row pi[s, :] of a stochastic policy must be probabilities summing to 1")
        return policy.astype(np.float64)
    raise ValueError(f"a policy must have shape ({S},) (actions) or ({S}, {A}) (probabilities), got {policy.shape}")


def policy_model(mdp: TabularMDP, policy) -> tuple[np.ndarray, np.ndarray]:
    """The Markov chain a policy induces: P_pi[s, s'] = sum_a pi(a|s) P[s,a,s'], R_pi[s] = sum_a pi(a|s) R[s,a]."""
    pi = as_stochastic(mdp, policy)
    return np.einsum("sa,sat->st", pi, mdp.P), (pi * mdp.R).sum(1)


def q_from_v(mdp: TabularMDP, V: np.ndarray) -> np.ndarray:
    """Q(s, a) = R(s, a) + gamma sum_s' P(s'|s,a) V(s')."""
    return mdp.R + mdp.gamma * mdp.P @ V


def policy_evaluation(mdp: TabularMDP, policy, tol: float = 1e-10, max_sweeps: int = 100_000) -> np.ndarray:
    """Iterate the Bellman expectation backup V <- R_pi + gamma P_pi V until the max change is < tol."""
    P_pi, R_pi = policy_model(mdp, policy)
    V = np.zeros(mdp.n_states)
    for _ in range(max_sweeps):
        V_new = R_pi + mdp.gamma * P_pi @ V
        if np.max(np.abs(V_new - V)) < tol:
            return V_new
        V = V_new
    raise RuntimeError(f"policy evaluation did not converge in {max_sweeps} sweeps: with gamma = 1 the policy "
                       "must reach a terminal state; lower gamma or raise max_sweeps")


def solve_policy_exact(mdp: TabularMDP, policy) -> np.ndarray:
    """V_pi exactly, by solving the linear system (I - gamma P_pi) V = R_pi (independent of any iteration)."""
    P_pi, R_pi = policy_model(mdp, policy)
    A = np.eye(mdp.n_states) - mdp.gamma * P_pi
    if mdp.gamma == 1.0:  # terminal states are absorbing with reward 0: pin their value to 0
        A[mdp.terminal] = np.eye(mdp.n_states)[mdp.terminal]
    try:
        return np.linalg.solve(A, R_pi)
    except np.linalg.LinAlgError:
        raise ValueError("I - gamma P_pi is singular: with gamma = 1 the policy never terminates") from None


def greedy_policy(mdp: TabularMDP, V: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """pi(s) = argmax_a Q(s, a); ties (within tol) go to the lowest action so the result is reproducible."""
    Q = q_from_v(mdp, V)
    return np.argmax(Q >= Q.max(1, keepdims=True) - tol, axis=1)


@dataclass
class VIResult:
    V: np.ndarray
    policy: np.ndarray
    deltas: list[float] = field(default_factory=list)  # max |V_new - V| of each sweep

    @property
    def sweeps(self) -> int:
        return len(self.deltas)


def value_iteration(mdp: TabularMDP, tol: float = 1e-10, max_sweeps: int = 100_000) -> VIResult:
    """Iterate the Bellman optimality backup V <- max_a [R + gamma P V] until the max change is < tol.

    The backup is a gamma-contraction, so the change shrinks at least by gamma per sweep; ``deltas`` records
    it. The greedy policy of the final V is optimal.
    """
    check_discount(mdp.gamma)
    V, deltas = np.zeros(mdp.n_states), []
    for _ in range(max_sweeps):
        V_new = q_from_v(mdp, V).max(1)
        deltas.append(float(np.max(np.abs(V_new - V))))
        V = V_new
        if deltas[-1] < tol:
            return VIResult(V, greedy_policy(mdp, V), deltas)
    raise RuntimeError(f"value iteration did not converge in {max_sweeps} sweeps (last change {deltas[-1]:.3g})")


@dataclass
class PIResult:
    V: np.ndarray
    policy: np.ndarray
    iterations: int
    evaluations: list[np.ndarray] = field(default_factory=list)


def policy_iteration(mdp: TabularMDP, max_iterations: int = 1000) -> PIResult:
    """Alternate exact evaluation V_pi = (I - gamma P_pi)^-1 R_pi and greedy improvement until pi is stable."""
    policy = np.zeros(mdp.n_states, dtype=np.int64)
    evaluations = []
    for it in range(1, max_iterations + 1):
        V = solve_policy_exact(mdp, policy)
        evaluations.append(V)
        new_policy = greedy_policy(mdp, V)
        if np.array_equal(new_policy, policy):
            return PIResult(V, policy, it, evaluations)
        policy = new_policy
    raise RuntimeError(f"policy iteration did not stabilise in {max_iterations} iterations")


def two_state_mdp(gamma: float = 0.9) -> TabularMDP:
    """A 2-state MDP with a closed-form solution (used in tests and exercises).

    State 0: action 0 "stay" gives reward 1 and stays; action 1 "move" gives reward 0 and goes to state 1.
    State 1: action 0 "stay" gives reward 2 and stays; action 1 "move" gives reward 0 and goes to state 0.
    Optimal: move to state 1 then stay forever, V*(1) = 2/(1-gamma), V*(0) = max(1/(1-gamma), gamma V*(1)).
    """
    P = np.zeros((2, 2, 2))
    P[0, 0, 0] = P[0, 1, 1] = P[1, 0, 1] = P[1, 1, 0] = 1.0
    R = np.array([[1.0, 0.0], [2.0, 0.0]])
    return TabularMDP(P, R, gamma)
