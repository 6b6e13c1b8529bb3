"""Chapter 02: REINFORCE, the policy gradient from sampled episodes.

Policy gradient theorem with returns-to-go and a baseline b(s_t):

    grad J(theta) = E[ sum_t grad log pi_theta(a_t | s_t) (G_t - b(s_t)) ],   G_t = sum_{k>=t} gamma^(k-t) r_k

A baseline that does not depend on the action leaves the expectation unchanged (E[grad log pi] = 0) but
can cut the variance of the estimate a lot; :func:`gradient_variance` measures by how much.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .envs import VecCartPole, check_discount, make_rng


class MLPPolicy(nn.Module):
    """A small policy network: observation -> tanh MLP -> logits over the discrete actions."""

    def __init__(self, obs_dim: int = 4, n_actions: int = 2, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, n_actions))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(obs)

    def dist(self, obs: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self(obs))


def sample_actions(policy, obs: np.ndarray, rng: np.random.Generator, greedy: bool = False) -> np.ndarray:
    """Actions for a batch of observations: sampled from pi(.|s) (NumPy rng, reproducible) or argmax.

    ``policy=None`` is the uniform random policy. ``policy`` may return logits or an object with ``.logits``.
    """
    if policy is None:
        return rng.integers(0, 2, size=len(obs))
    with torch.no_grad():
        logits = policy(torch.as_tensor(obs))
        logits = getattr(logits, "logits", logits)
        if greedy:
            return logits.argmax(-1).numpy()
        probs = torch.softmax(logits, -1).double().numpy()
    return sample_categorical(probs, rng)


def sample_categorical(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One draw per row of ``probs`` (shape (N, A)) by inverting the cumulative distribution."""
    cdf = np.cumsum(probs, -1)
    u = rng.random((len(probs), 1)) * cdf[:, -1:]
    return np.minimum((u > cdf).sum(-1), probs.shape[1] - 1)


@dataclass
class EpisodeBatch:
    """N complete episodes padded to the longest: arrays of shape (T, N, ...) and a validity mask."""

    obs: np.ndarray  # (T, N, obs_dim)
    actions: np.ndarray  # (T, N)
    rewards: np.ndarray  # (T, N), 0 after the episode ended
    mask: np.ndarray  # (T, N) True while the episode runs

    @property
    def returns(self) -> np.ndarray:
        """Undiscounted return of each episode."""
        return self.rewards.sum(0)

    @property
    def n_steps(self) -> int:
        return int(self.mask.sum())


def collect_episodes(policy, n_episodes: int, seed: int | None = None, greedy: bool = False,
                     env=None, max_steps: int = 500) -> EpisodeBatch:
    """Run ``n_episodes`` CartPole episodes in parallel (one per vectorised env) until each one ends.

    Only the first episode of each env is kept, so the batch is an unbiased sample of episodes.
    """
    env = env or VecCartPole(n_episodes, max_episode_steps=max_steps)
    rng = make_rng(seed)
    obs, _ = env.reset(seed=None if seed is None else seed + 10_000)
    alive = np.ones(n_episodes, dtype=bool)
    O, A, Rw, M = [], [], [], []
    while alive.any():
        actions = sample_actions(policy, obs, rng, greedy)
        next_obs, rewards, terminated, truncated, _ = env.step(actions)
        O.append(obs)
        A.append(actions)
        Rw.append(rewards * alive)
        M.append(alive.copy())
        alive &= ~(terminated | truncated)
        obs = next_obs
    return EpisodeBatch(np.stack(O), np.stack(A), np.stack(Rw).astype(np.float32), np.stack(M))


def evaluate_policy(policy, n_episodes: int = 20, seed: int = 12345, greedy: bool = False) -> float:
    """Mean undiscounted return over ``n_episodes`` fresh CartPole episodes (``policy=None``: random)."""
    return float(collect_episodes(policy, n_episodes, seed=seed, greedy=greedy).returns.mean())


def returns_to_go(rewards: np.ndarray, gamma: float) -> np.ndarray:
    """G_t = r_t + gamma G_{t+1} (time on axis 0; rewards after an episode's end must be 0)."""
    gamma = check_discount(gamma)
    G = np.zeros_like(rewards, dtype=np.float64)
    running = np.zeros(rewards.shape[1:])
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running
        G[t] = running
    return G


def time_baseline(G: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """b_t = mean return-to-go at time step t over the episodes still running (a "mean return" baseline)."""
    counts = np.maximum(mask.sum(1), 1)
    return (G * mask).sum(1) / counts


def reinforce_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Surrogate whose gradient is the REINFORCE estimate: loss = -mean_t[ log pi(a_t|s_t) * A_t ].

    ``advantages`` (G_t - b_t) are constants: no gradient flows through them.
    """
    weighted = logp * advantages.detach()
    if mask is None:
        return -weighted.mean()
    return -(weighted * mask).sum() / mask.sum()


@dataclass
class ReinforceConfig:
    """Hyperparameters of :func:`train_reinforce` (the defaults solve most of CartPole in ~10 s on a CPU).

    baseline: "none", "mean" (mean return-to-go at the same time step across the batch) or "value"
    (a learned V(s) fitted to the returns-to-go, a small MLP). normalize: scale advantages to mean 0 and
    std 1 per batch (a per-batch step size that makes one learning rate work all along training).
    """

    seed: int = 0
    iterations: int = 60
    episodes_per_batch: int = 16
    lr: float = 0.02
    gamma: float = 0.99
    baseline: str = "mean"
    normalize: bool = True
    hidden: int = 32
    value_lr: float = 0.01
    value_steps: int = 20

    def __post_init__(self):
        check_discount(self.gamma)
        if self.baseline not in ("none", "mean", "value"):
            raise ValueError(f"baseline must be 'none', 'mean' or 'value', got {self.baseline!r}")


@dataclass
class ReinforceHistory:
    iteration: list[int] = field(default_factory=list)
    mean_return: list[float] = field(default_factory=list)
    env_steps: list[int] = field(default_factory=list)
    seconds: float = 0.0


def train_reinforce(config: ReinforceConfig = ReinforceConfig(), progress: bool = False):
    """Train an :class:`MLPPolicy` on CartPole with REINFORCE; returns ``(policy, history)``."""
    torch.manual_seed(config.seed)
    policy = MLPPolicy(hidden=config.hidden)
    opt = torch.optim.Adam(policy.parameters(), lr=config.lr)
    value = opt_v = None
    if config.baseline == "value":
        value = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
        opt_v = torch.optim.Adam(value.parameters(), lr=config.value_lr)
    hist, steps, t0 = ReinforceHistory(), 0, time.perf_counter()
    iterator = range(config.iterations)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"REINFORCE seed {config.seed}")
    for it in iterator:
        batch = collect_episodes(policy, config.episodes_per_batch, seed=config.seed * 100_003 + it)
        G = returns_to_go(batch.rewards, config.gamma)
        obs = torch.as_tensor(batch.obs)
        mask = torch.as_tensor(batch.mask, dtype=torch.float32)
        G_t = torch.as_tensor(G, dtype=torch.float32)
        if config.baseline == "mean":
            adv = G_t - torch.as_tensor(time_baseline(G, batch.mask), dtype=torch.float32)[:, None]
        elif config.baseline == "value":
            with torch.no_grad():
                adv = G_t - value(obs).squeeze(-1)
        else:
            adv = G_t
        if config.normalize:
            m = mask.bool()
            adv = (adv - adv[m].mean()) / (adv[m].std() + 1e-8)
        logp = policy.dist(obs).log_prob(torch.as_tensor(batch.actions))
        loss = reinforce_loss(logp, adv, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if value is not None:  # fit V(s) to the returns-to-go (regression, on the valid steps)
            for _ in range(config.value_steps):
                v_loss = (((value(obs).squeeze(-1) - G_t) ** 2) * mask).sum() / mask.sum()
                opt_v.zero_grad()
                v_loss.backward()
                opt_v.step()
        steps += batch.n_steps
        hist.iteration.append(it)
        hist.mean_return.append(float(batch.returns.mean()))
        hist.env_steps.append(steps)
        if progress:
            iterator.set_postfix(mean_return=f"{hist.mean_return[-1]:.0f}")
    hist.seconds = time.perf_counter() - t0
    return policy, hist


def episode_gradients(policy: MLPPolicy, batch: EpisodeBatch, gamma: float, baseline: np.ndarray | None) -> np.ndarray:
    """One policy-gradient estimate per episode, flattened: g_i = sum_t grad log pi(a_t|s_t) (G_t - b_t)."""
    G = returns_to_go(batch.rewards, gamma)
    if baseline is not None:
        b = np.zeros(len(G))
        b[: min(len(G), len(baseline))] = baseline[: len(G)]
        G = G - b[:, None]
    grads = []
    for i in range(batch.obs.shape[1]):
        T = int(batch.mask[:, i].sum())
        logp = policy.dist(torch.as_tensor(batch.obs[:T, i])).log_prob(torch.as_tensor(batch.actions[:T, i]))
        weight = torch.as_tensor(G[:T, i], dtype=torch.float32)
        policy.zero_grad()
        (logp * weight).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters()]).numpy().copy())
    policy.zero_grad()
    return np.stack(grads)


def gradient_variance(policy: MLPPolicy, n_episodes: int = 64, gamma: float = 0.99, seed: int = 0,
                      n_reference: int = 64) -> dict[str, float]:
    """Variance of the per-episode REINFORCE gradient, without and with a baseline, on the same episodes.

    The baseline b_t (mean return-to-go at step t) is estimated on ``n_reference`` separate episodes, so it
    is independent of the episodes it is applied to and leaves the estimate unbiased. Variance is the
    trace of the covariance of the gradient vector: sum over parameters of Var_i[g_i].
    """
    ref = collect_episodes(policy, n_reference, seed=seed + 1)
    b = time_baseline(returns_to_go(ref.rewards, gamma), ref.mask)
    batch = collect_episodes(policy, n_episodes, seed=seed)
    g_none = episode_gradients(policy, batch, gamma, None)
    g_base = episode_gradients(policy, batch, gamma, b)
    return {
        "var_no_baseline": float(g_none.var(0, ddof=1).sum()),
        "var_baseline": float(g_base.var(0, ddof=1).sum()),
        "mean_grad_norm_no_baseline": float(np.linalg.norm(g_none.mean(0))),
        "mean_grad_norm_baseline": float(np.linalg.norm(g_base.mean(0))),
        "mean_return": float(batch.returns.mean()),
    }
