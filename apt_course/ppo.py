"""Chapter 03: Proximal Policy Optimization (PPO), CleanRL-style, for discrete actions.

One update: collect ``num_envs * num_steps`` transitions with the current policy, compute advantages with
GAE(lambda), then take several epochs of minibatch steps on

    loss = -E[min(r A, clip(r, 1-eps, 1+eps) A)] + c_v * value_loss - c_e * entropy,   r = pi_new(a|s) / pi_old(a|s)

The clip removes the incentive to move the ratio beyond [1-eps, 1+eps], so many gradient steps can reuse
one batch of experience without the policy running away from the data that estimated A.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from .envs import VecCartPole, check_discount, make_rng
from .reinforce import collect_episodes, sample_categorical


def compute_gae(rewards, values, dones, last_value, gamma: float, gae_lambda: float):
    """Generalised advantage estimation. Time is axis 0; any further axes are parallel envs.

        delta_t = r_t + gamma (1 - d_t) V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma lambda (1 - d_t) A_{t+1}          returns_t = A_t + V(s_t)

    ``dones[t]`` is 1 when the transition at step t ended the episode by termination: nothing is
    bootstrapped past it. ``V(s_{t+1})`` is ``values[t+1]``, or ``last_value`` for the last step. (A
    truncated episode is not terminal: add gamma V(final state) to its last reward and mark it done.)
    Returns ``(advantages, returns)`` as float arrays shaped like ``rewards``.
    """
    gamma = check_discount(gamma)
    if not 0.0 <= gae_lambda <= 1.0:
        raise ValueError(f"gae_lambda must be in [0, 1], got {gae_lambda!r} (0: one-step TD, 1: Monte Carlo)")
    rewards, values = np.asarray(rewards, np.float64), np.asarray(values, np.float64)
    dones = np.asarray(dones, np.float64)
    if not rewards.shape == values.shape == dones.shape:
        raise ValueError(f"rewards, values, dones must have one shape, got {rewards.shape}, {values.shape}, {dones.shape}")
    adv = np.zeros_like(rewards)
    next_adv = np.zeros(rewards.shape[1:])
    next_value = np.asarray(last_value, np.float64)
    for t in range(len(rewards) - 1, -1, -1):
        nonterminal = 1.0 - dones[t]
        delta = rewards[t] + gamma * nonterminal * next_value - values[t]
        next_adv = delta + gamma * gae_lambda * nonterminal * next_adv
        adv[t] = next_adv
        next_value = values[t]
    return adv, adv + values


def approx_kl(log_ratio: torch.Tensor) -> float:
    """PPO's diagnostic KL(π_old || π_new) from ``log_ratio = log π_new - log π_old`` on actions sampled from π_old:
    the mean of k3 = (r - 1) - log r, r = e^log_ratio (never negative; its expectation is the KL)."""
    return ((log_ratio.exp() - 1) - log_ratio).mean().item()


def clip_fraction(log_ratio: torch.Tensor, epsilon: float) -> float:
    """The share of samples whose ratio r = e^log_ratio lies outside [1 - ε, 1 + ε], where the clip is active."""
    return ((log_ratio.exp() - 1).abs() > epsilon).float().mean().item()


def ppo_policy_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    epsilon: float) -> torch.Tensor:
    """Clipped surrogate loss: -mean(min(r A, clip(r, 1 - ε, 1 + ε) A)), r = exp(new_logp - old_logp)."""
    ratio = torch.exp(new_logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + epsilon) * advantages
    return -torch.min(unclipped, clipped).mean()


def ppo_value_loss(new_values, old_values, returns, clip_value: float | None) -> torch.Tensor:
    """0.5 * mean(max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)), c = ``clip_value``; plain MSE when
    it is None."""
    unclipped = (new_values - returns) ** 2
    if clip_value is None:
        return 0.5 * unclipped.mean()
    clipped = (old_values + torch.clamp(new_values - old_values, -clip_value, clip_value) - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped).mean()


def explained_variance(y_pred: np.ndarray, y_true: np.ndarray) -> float:
    """1 - Var[y_true - y_pred] / Var[y_true]: 1 is a perfect value function, 0 no better than a constant."""
    var = np.var(y_true)
    return float("nan") if var == 0 else float(1 - np.var(y_true - y_pred) / var)


def _layer(n_in, n_out, std=np.sqrt(2)):
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, std)
    nn.init.zeros_(layer.bias)
    return layer


class ActorCritic(nn.Module):
    """Separate actor (logits) and critic (V(s)) MLPs with orthogonal init, as in CleanRL."""

    def __init__(self, obs_dim: int = 4, n_actions: int = 2, hidden: int = 64):
        super().__init__()
        self.critic = nn.Sequential(_layer(obs_dim, hidden), nn.Tanh(), _layer(hidden, hidden), nn.Tanh(),
                                    _layer(hidden, 1, 1.0))
        self.actor = nn.Sequential(_layer(obs_dim, hidden), nn.Tanh(), _layer(hidden, hidden), nn.Tanh(),
                                   _layer(hidden, n_actions, 0.01))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Logits of the policy (so an ActorCritic can be used wherever a policy is expected)."""
        return self.actor(obs)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)


@dataclass
class PPOConfig:
    """Hyperparameters of :func:`train_ppo` (defaults: CartPole to 500 in ~10 s on one CPU core).

    seed: seeds torch and the environments.          total_steps: env steps in all (num_envs at a time).
    num_envs, num_steps: a rollout is num_steps steps of num_envs parallel envs (batch = their product).
    gamma: discount.  gae_lambda: GAE's lambda (bias-variance of the advantage; 1 = Monte Carlo, 0 = one-step TD).
    lr: Adam learning rate; anneal_lr: decay it linearly to 0 over training (stabilises the end).
    update_epochs, num_minibatches: passes over each batch and minibatches per pass.
    epsilon: ε of the clipped surrogate; clip_value: clip each value update to ±clip_value (None, the default:
    CartPole's returns reach ~100, and moving V by at most 0.2 per update makes the critic lag).
    norm_adv: normalise advantages per minibatch.  vf_coef, ent_coef: weights of value loss and entropy.
    max_grad_norm: clip the global gradient norm.  target_kl: stop an update's epochs early above it.
    hidden: width of the two-layer actor and critic.
    """

    seed: int = 0
    total_steps: int = 163_840
    num_envs: int = 16
    num_steps: int = 128
    gamma: float = 0.99
    gae_lambda: float = 0.95
    lr: float = 2.5e-3
    anneal_lr: bool = True
    update_epochs: int = 4
    num_minibatches: int = 8
    epsilon: float = 0.2
    clip_value: float | None = None
    norm_adv: bool = True
    vf_coef: float = 0.5
    ent_coef: float = 0.0
    max_grad_norm: float = 0.5
    target_kl: float | None = None
    hidden: int = 64

    def __post_init__(self):
        check_discount(self.gamma)
        if self.num_envs * self.num_steps % self.num_minibatches:
            raise ValueError("num_envs * num_steps must be divisible by num_minibatches")

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_updates(self) -> int:
        return max(1, self.total_steps // self.batch_size)


@dataclass
class PPOHistory:
    """One entry per update; ``episode_return`` is the mean return of episodes that ended in the rollout."""

    step: list[int] = field(default_factory=list)
    episode_return: list[float] = field(default_factory=list)
    policy_loss: list[float] = field(default_factory=list)
    value_loss: list[float] = field(default_factory=list)
    entropy: list[float] = field(default_factory=list)
    approx_kl: list[float] = field(default_factory=list)
    clip_fraction: list[float] = field(default_factory=list)
    explained_variance: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps_per_second: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def cartpole_fn(num_envs: int, seed: int | None = None) -> VecCartPole:
    """The default ``env_fn`` of :func:`train_ppo`: a :class:`VecCartPole`."""
    return VecCartPole(num_envs, seed=seed)


def train_ppo(env_fn=cartpole_fn, config: PPOConfig = PPOConfig(), progress: bool = False):
    """Train an :class:`ActorCritic` with PPO. ``env_fn(num_envs, seed)`` returns a vectorised env with auto-reset
    (like :class:`VecCartPole`: ``info["final_obs"]`` for bootstrapping truncations, ``info["episode_return"]``).

    Returns ``(policy, history)``.
    """
    c = config
    torch.manual_seed(c.seed)
    env = env_fn(c.num_envs, c.seed)
    rng = make_rng(c.seed)
    agent = ActorCritic(env.observation_dim, env.n_actions, c.hidden)
    opt = torch.optim.Adam(agent.parameters(), lr=c.lr, eps=1e-5)
    T, N = c.num_steps, c.num_envs
    obs_buf = np.zeros((T, N, env.observation_dim), np.float32)
    act_buf, logp_buf = np.zeros((T, N), np.int64), np.zeros((T, N), np.float32)
    rew_buf, done_buf, val_buf = np.zeros((T, N)), np.zeros((T, N)), np.zeros((T, N))
    obs, _ = env.reset(seed=c.seed)
    hist, t0, global_step = PPOHistory(), time.perf_counter(), 0
    iterator = range(c.num_updates)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc=f"PPO seed {c.seed}")
    for update in iterator:
        lr = c.lr * (1.0 - update / c.num_updates) if c.anneal_lr else c.lr
        opt.param_groups[0]["lr"] = lr
        finished = []
        # ---- rollout: num_steps steps of num_envs envs with the current (old) policy ----
        for t in range(T):
            with torch.no_grad():
                o = torch.as_tensor(obs)
                logits, v = agent(o), agent.value(o)
            logp_all = torch.log_softmax(logits, -1).double().numpy()
            action = sample_categorical(np.exp(logp_all), rng)
            obs_buf[t], act_buf[t], val_buf[t] = obs, action, v.numpy()
            logp_buf[t] = logp_all[np.arange(N), action]
            obs, reward, terminated, truncated, info = env.step(action)
            reward = reward.astype(np.float64)
            if truncated.any():  # a time limit is not a terminal state: bootstrap from the final observation
                with torch.no_grad():
                    v_final = agent.value(torch.as_tensor(info["final_obs"][truncated])).numpy()
                reward[truncated] += c.gamma * v_final
            rew_buf[t], done_buf[t] = reward, terminated | truncated
            finished.extend(info["episode_return"][terminated | truncated].tolist())
        global_step += T * N
        with torch.no_grad():
            last_value = agent.value(torch.as_tensor(obs)).numpy()
        adv, ret = compute_gae(rew_buf, val_buf, done_buf, last_value, c.gamma, c.gae_lambda)
        # ---- update: several epochs of minibatch steps on the flattened batch ----
        b_obs = torch.as_tensor(obs_buf.reshape(-1, env.observation_dim))
        b_act, b_logp = torch.as_tensor(act_buf.reshape(-1)), torch.as_tensor(logp_buf.reshape(-1))
        b_adv = torch.as_tensor(adv.reshape(-1), dtype=torch.float32)
        b_ret = torch.as_tensor(ret.reshape(-1), dtype=torch.float32)
        b_val = torch.as_tensor(val_buf.reshape(-1), dtype=torch.float32)
        mb_size = c.batch_size // c.num_minibatches
        clipfracs, kls = [], []
        for _epoch in range(c.update_epochs):
            perm = torch.as_tensor(rng.permutation(c.batch_size))
            for start in range(0, c.batch_size, mb_size):
                mb = perm[start:start + mb_size]
                dist = torch.distributions.Categorical(logits=agent(b_obs[mb]))
                new_logp, entropy = dist.log_prob(b_act[mb]), dist.entropy().mean()
                log_ratio = new_logp - b_logp[mb]
                with torch.no_grad():  # diagnostics: KL(old || new) estimate (k3) and how often the clip is active
                    kls.append(approx_kl(log_ratio))
                    clipfracs.append(clip_fraction(log_ratio, c.epsilon))
                mb_adv = b_adv[mb]
                if c.norm_adv:
                    mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                pg_loss = ppo_policy_loss(new_logp, b_logp[mb], mb_adv, c.epsilon)
                v_loss = ppo_value_loss(agent.value(b_obs[mb]), b_val[mb], b_ret[mb], c.clip_value)
                loss = pg_loss + c.vf_coef * v_loss - c.ent_coef * entropy
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(agent.parameters(), c.max_grad_norm)
                opt.step()
            if c.target_kl is not None and np.mean(kls[-c.num_minibatches:]) > c.target_kl:
                break
        hist.step.append(global_step)
        hist.episode_return.append(float(np.mean(finished)) if finished else float("nan"))
        hist.policy_loss.append(pg_loss.item())
        hist.value_loss.append(v_loss.item())
        hist.entropy.append(entropy.item())
        hist.approx_kl.append(float(np.mean(kls)))
        hist.clip_fraction.append(float(np.mean(clipfracs)))
        hist.explained_variance.append(explained_variance(val_buf.reshape(-1), ret.reshape(-1)))
        hist.lr.append(lr)
        if progress:
            iterator.set_postfix(ret=f"{hist.episode_return[-1]:.0f}", kl=f"{hist.approx_kl[-1]:.3f}")
    hist.seconds = time.perf_counter() - t0
    hist.steps_per_second = global_step / hist.seconds
    return agent, hist


def evaluate_ppo(agent, n_episodes: int = 20, seed: int = 12345, greedy: bool = False) -> np.ndarray:
    """Returns of ``n_episodes`` fresh CartPole episodes (run in parallel) with the trained policy."""
    return collect_episodes(agent, n_episodes, seed=seed, greedy=greedy).returns
