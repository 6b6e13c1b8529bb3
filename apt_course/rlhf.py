"""Chapter 06: RLHF with PPO on a language model, from scratch (TRL 1.x has no PPOTrainer).

One PPO update, in the style of CleanRL and TRL 0.x's PPOTrainer:

1. **Rollout.** Sample a completion y ~ π_θ(·|x) for each prompt; the reward model scores it, s = RM(x, y).
2. **KL-shaped rewards.** Each completion token t gets r_t = -β (log π_θ(y_t) - log π_ref(y_t)) (a per-token
   k1 estimate of the KL to the frozen reference), and the last token also gets the score: r_T += s.
3. **GAE over tokens** (chapter 03's :func:`~apt_course.ppo.compute_gae`, γ = 1): with the value head's
   V_t, δ_t = r_t + V_{t+1} - V_t, A_t = δ_t + λ A_{t+1}; returns R_t = A_t + V_t. Advantages are whitened.
4. **Several epochs over minibatches** of the clipped policy loss (:func:`~apt_course.ppo.ppo_policy_loss`)
   plus c_v × the clipped value loss (:func:`~apt_course.ppo.ppo_value_loss`), on completion tokens only.

Logged: RM score, KL to the reference (sum over tokens, per sequence), approx KL between the rollout and
the updated policy, clip fraction, explained variance of the value head.

Before any RL, :func:`best_of_n` is the baseline RL must beat: sample n replies, keep the one the RM scores
highest. It moves the policy by at most :func:`best_of_n_kl` = log n - (n-1)/n nats, and needs no training.

The library counterpart is TRL's ``RLOOTrainer`` (REINFORCE leave-one-out, no value head):
:func:`rloo_advantages` and :func:`rloo_loss` write its estimator out, and a test checks them against TRL.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .lm import (
    batch_inputs,
    completion_logprobs,
    completion_token_logprobs,
    format_prompts,
    nanstd,
    prompt_rows,
    sample_groups,
)
from .ppo import approx_kl, clip_fraction, compute_gae, explained_variance, ppo_policy_loss, ppo_value_loss
from .training import make_optimizer, optimizer_step, progress


class PolicyWithValue(nn.Module):
    """A causal LM plus a scalar value head on its last hidden state: V(x, y_<t) for every position."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask):
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return out.logits, self.value_head(out.hidden_states[-1]).squeeze(-1)


def kl_shaped_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                      beta: float) -> torch.Tensor:
    """Per-token rewards r_t = -β (log π - log π_ref)_t on completion tokens, plus the RM score on the last one.

    scores: (B,); logp, ref_logp, mask: (B, T). Returns (B, T), zero outside the mask.
    """
    mask = mask.to(logp.dtype)
    rewards = -beta * (logp - ref_logp) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(scores)), last] += scores.to(rewards.dtype)
    return rewards


def token_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gae_lambda: float = 0.95,
              gamma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE over completion tokens (batch-first tensors), through chapter 03's ``compute_gae``.

    Tokens after a completion's last one are marked done, so nothing is bootstrapped past the end.
    Returns ``(advantages, returns)``, (B, T), zero outside the mask.
    """
    m = mask.detach().cpu().numpy().astype(np.float64)
    r = (rewards.detach().cpu().numpy() * m).T
    v = (values.detach().cpu().numpy() * m).T
    last = m.sum(1).astype(int) - 1
    dones = (np.arange(m.shape[1])[:, None] >= last[None, :]).astype(np.float64)
    adv, ret = compute_gae(r, v, dones, np.zeros(m.shape[0]), gamma, gae_lambda)
    to = lambda a: torch.tensor(a.T, dtype=values.dtype, device=values.device) * mask  # noqa: E731
    return to(adv), to(ret)


@dataclass
class RLHFConfig:
    """Settings of :func:`train_rlhf`.

    steps: PPO updates, each on a fresh rollout of ``batch_size`` prompts. minibatch_size, ppo_epochs:
    passes over the rollout and their minibatches. lr: AdamW (policy and value head). beta: KL-penalty
    coefficient (0 = no leash: watch the reward model get over-optimised). epsilon: ε of the policy ratio's clip;
    clip_value: the value update's clip (None = plain MSE). vf_coef: value-loss weight. gamma, gae_lambda: GAE.
    whiten: normalise advantages over the rollout's tokens. temperature, max_new_tokens: sampling.
    """

    steps: int = 30
    batch_size: int = 32
    minibatch_size: int = 16
    ppo_epochs: int = 4
    lr: float = 1e-4
    beta: float = 0.05
    epsilon: float = 0.2
    clip_value: float | None = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    gae_lambda: float = 0.95
    whiten: bool = True
    temperature: float = 1.0
    max_new_tokens: int = 8
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.batch_size % self.minibatch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of minibatch_size "
                             f"({self.minibatch_size})")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


def _forward(policy: PolicyWithValue, batch: dict, temperature: float):
    """Per-token log π of a rollout's completion tokens and V of the state before each of them."""
    logits, values = policy(**batch_inputs(batch))
    logp, _ = completion_token_logprobs(logits, batch, temperature)
    P = batch["prompt_ids"].size(1)
    return logp, values[:, P - 1:-1]  # V of the state before each completion token


def check_reward_fn(reward_fn) -> str:
    """Fail early, with the fix, unless ``reward_fn`` can be called as ``reward_fn(prompts, completions)``."""
    import inspect

    name = getattr(reward_fn, "__name__", type(reward_fn).__name__)
    if not callable(reward_fn):
        raise TypeError(f"reward_fn must be a function reward_fn(prompts, completions) -> tensor (N,), got {name}")
    try:
        inspect.signature(reward_fn).bind(["p"], ["c"])
    except TypeError as e:
        raise TypeError(f"reward_fn {name!r} cannot be called as {name}(prompts, completions) ({e}); write it as "
                        "`def reward_fn(prompts, completions): return torch.tensor([...])`, one score per "
                        "completion (e.g. apt_course.rlhf.rm_reward_fn(rm, rm_tokenizer))") from None
    except ValueError:  # a builtin without a signature: let the call decide
        pass
    return name


def _scores(reward_fn, name: str, prompts: list, completions: list) -> torch.Tensor:
    """Call the reward function and check its answer: one finite number per completion."""
    try:
        out = reward_fn(prompts, completions)
    except Exception as e:
        raise RuntimeError(f"reward_fn {name!r} raised {type(e).__name__}: {e} (first prompt {prompts[0]!r}, "
                           f"completion {completions[0]!r})") from e
    scores = torch.as_tensor(out, dtype=torch.float32).flatten().cpu() if out is not None else None
    if scores is None or scores.numel() != len(completions):
        raise ValueError(f"reward_fn {name!r} returned {None if scores is None else scores.numel()} scores for "
                         f"{len(completions)} completions: return one number per completion")
    if not torch.isfinite(scores).all():
        bad = int((~torch.isfinite(scores)).nonzero()[0])
        raise ValueError(f"reward_fn {name!r} returned {scores[bad].item()} for completion {completions[bad]!r} "
                         f"(prompt {prompts[bad]!r}): PPO needs a finite score for every reply")
    return scores


def train_rlhf(policy: PolicyWithValue, ref_model, tokenizer, prompts, reward_fn,
               config: RLHFConfig = RLHFConfig(), eval_fn=None, eval_every: int = 10) -> dict:
    """PPO on ``prompts`` against ``reward_fn(prompts, completions) -> tensor (N,)`` (e.g. a reward model).

    Returns the history: ``score`` (mean reward-model score of the rollout), ``kl`` (mean per-sequence sum
    of log π - log π_ref), ``approx_kl``, ``clip_fraction``, ``explained_variance``, ``length``.
    ``eval_fn(lm) -> dict`` (optional) is called before step 0, every ``eval_every`` steps and at the end;
    its results land in ``history["eval"]`` as ``{"step": s, **metrics}`` (e.g. held-out ground truth).
    """
    rows = prompt_rows(prompts)
    if ref_model is None:
        raise ValueError("train_rlhf needs a frozen ref_model for the KL penalty (a copy of the starting model)")
    name = check_reward_fn(reward_fn)
    ref_model.eval().requires_grad_(False)
    texts = format_prompts(tokenizer, rows)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    n_mb = config.batch_size // config.minibatch_size
    opt, sched = make_optimizer(policy, config.lr, config.steps * config.ppo_epochs * n_mb)
    history = {k: [] for k in ("step", "score", "kl", "approx_kl", "clip_fraction", "explained_variance", "length",
                               "eval")}
    for step in progress(range(config.steps), "RLHF-PPO"):
        if eval_fn is not None and step % eval_every == 0:
            history["eval"].append({"step": step, **eval_fn(policy.lm)})
        idx = [rng.randrange(len(rows)) for _ in range(config.batch_size)]
        batch = sample_groups(policy.lm, tokenizer, [texts[i] for i in idx], 1, config.max_new_tokens,
                              config.temperature)
        mask = batch["completion_mask"].float()
        with torch.no_grad():
            scores = _scores(reward_fn, name, [rows[i]["prompt"] for i in idx], batch["texts"]).to(mask.device)
            old_logp, old_values = _forward(policy, batch, config.temperature)
            ref_logp = completion_logprobs(ref_model, batch, "none", config.temperature)
            rewards = kl_shaped_rewards(scores, old_logp, ref_logp, mask, config.beta)
            adv, returns = token_gae(rewards, old_values, mask, config.gae_lambda, config.gamma)
            if config.whiten:
                valid = adv[mask.bool()]
                adv = (adv - valid.mean()) / (valid.std() + 1e-8) * mask
        stats = {"approx_kl": [], "clip_fraction": []}
        for _ in range(config.ppo_epochs):
            for mb in torch.randperm(config.batch_size).view(n_mb, -1):
                sub = {k: v[mb] for k, v in batch.items() if isinstance(v, torch.Tensor)}
                logp, values = _forward(policy, sub, config.temperature)
                m = mask[mb].bool()
                pg = ppo_policy_loss(logp[m], old_logp[mb][m], adv[mb][m], config.epsilon)
                vl = ppo_value_loss(values[m], old_values[mb][m], returns[mb][m], config.clip_value)
                loss = pg + config.vf_coef * vl
                optimizer_step(loss, policy, opt, sched, config.max_grad_norm)
                with torch.no_grad():
                    log_ratio = logp[m] - old_logp[mb][m]
                    stats["approx_kl"].append(approx_kl(log_ratio))
                    stats["clip_fraction"].append(clip_fraction(log_ratio, config.epsilon))
        history["step"].append(step)
        history["score"].append(scores.mean().item())
        history["kl"].append(((old_logp - ref_logp) * mask).sum(1).mean().item())
        history["approx_kl"].append(float(np.mean(stats["approx_kl"])))
        history["clip_fraction"].append(float(np.mean(stats["clip_fraction"])))
        m = mask.bool()
        history["explained_variance"].append(explained_variance(old_values[m].cpu().numpy(),
                                                                returns[m].cpu().numpy()))
        history["length"].append(mask.sum(1).mean().item())
    if eval_fn is not None:
        history["eval"].append({"step": config.steps, **eval_fn(policy.lm)})
    return history


# ---------------------------------------------------------------- best-of-n: the baseline without training


def best_of_n_kl(n: int) -> float:
    """KL(π_bon ‖ π) = log n - (n-1)/n nats: how far best-of-n sampling moves from the policy it samples
    (Stiennon et al. 2020; Beirami et al. 2024 show it is an upper bound, reached when no two replies tie). With
    continuous reward ranks u ~ U(0, 1), π_bon has density n·u^(n-1), and E[log(n·u^(n-1))] = log n - (n-1)/n."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1 samples, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n(prompts: list, samples: list[list[str]], reward_fn, ns=(1, 2, 4, 8)) -> dict[int, dict]:
    """Best-of-n selection for every n in ``ns``: ``samples[i]`` holds prompt i's sampled replies; for each n, the
    reply the RM scores highest among the first n of them (nested: best-of-4 sees best-of-2's samples). Scores
    every reply once. Returns ``{n: {"replies": [...], "score": mean selected RM score, "kl_bound": ...}}``."""
    if len(samples) != len(prompts):
        raise ValueError(f"{len(samples)} groups of samples for {len(prompts)} prompts: give one group per prompt")
    k = min(map(len, samples)) if samples else 0
    if not ns or max(ns) > k:
        raise ValueError(f"best-of-{max(ns) if ns else '?'} needs at least that many samples per prompt; the "
                         f"smallest group has {k}")
    name = check_reward_fn(reward_fn)
    flat_prompts = [p for p, group in zip(prompts, samples) for _ in group[:k]]
    scores = _scores(reward_fn, name, flat_prompts, [r for group in samples for r in group[:k]]).view(len(prompts), k)
    out = {}
    for n in ns:
        best = scores[:, :n].argmax(1).tolist()
        out[n] = {"replies": [group[j] for group, j in zip(samples, best)],
                  "score": scores[:, :n].max(1).values.mean().item(), "kl_bound": best_of_n_kl(n)}
    return out


# ---------------------------------------------------------------- RLOO: the library counterpart, written out


def rloo_advantages(scores, kl=None, group_size: int = 4, beta: float = 0.0, normalize: bool = True,
                    eps: float = 1e-4) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al., 2024), k replies per prompt laid out prompt by prompt:

        r_i = s_i - β KL_i                   (KL_i = Σ_t log π(y_t) - log π_ref(y_t): the sequence's k1 sum)
        A_i = r_i - (Σ_{j≠i} r_j) / (k - 1)  (baseline: the mean reward of the *other* replies)
        A   = (A - mean A) / (std A + eps)   over the whole batch, when ``normalize`` (as TRL's default)

    The sequence reward Σ_t of :func:`kl_shaped_rewards` is the same r_i; PPO spreads it over tokens with a
    value head, RLOO uses one number per reply. A NaN score (unscorable reply) is left out of its siblings'
    baselines and gets A = 0.
    """
    r = torch.as_tensor(scores, dtype=torch.float32).flatten()
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2 (leave-one-out needs a sibling), got {group_size!r}")
    if r.numel() == 0 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} scores do not split into groups of {group_size}: pass k scores per prompt")
    if kl is not None and beta:
        r = r - beta * torch.as_tensor(kl, dtype=torch.float32).flatten()
    groups = r.view(-1, group_size)
    counts = (~torch.isnan(groups)).sum(1, keepdim=True)
    baselines = (torch.nansum(groups, 1, keepdim=True) - groups) / (counts - 1)
    adv = (groups - baselines).flatten()
    if normalize:
        adv = (adv - torch.nanmean(adv)) / (nanstd(adv, dim=None) + eps)
    return torch.nan_to_num(adv, nan=0.0)


def rloo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              epsilon: float = 0.2, epsilon_high: float | None = None) -> torch.Tensor:
    """RLOO's clipped objective on the **sequence** ratio ρ_i = exp(Σ_t log π(y_t) - Σ_t log π_old(y_t)):

        L = mean_i -min(ρ_i A_i, clip(ρ_i, 1 - ε, 1 + ε_high) A_i)

    logp, old_logp, mask: (B, T) completion tokens; advantages: (B,).
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp((logp * mask).sum(1) - (old_logp * mask).sum(1))
    high = epsilon if epsilon_high is None else epsilon_high
    return -torch.min(ratio * advantages, ratio.clamp(1 - epsilon, 1 + high) * advantages).mean()


# ---------------------------------------------------------------- the reward model as a reward function


def rm_reward_fn(rm, rm_tokenizer):
    """``reward_fn(prompts, completions) -> tensor (N,)`` for :func:`train_rlhf`: the RM's score."""
    from .reward_model import score

    def reward_fn(prompts, completions):
        return score(rm, rm_tokenizer, list(prompts), [str(c) for c in completions])

    return reward_fn


def load_rlhf_reward_fn(profile, device="cpu", reward_model: str | None = None, dtype=None):
    """``reward_fn(prompts, completions) -> tensor (N,)`` for a profile: the shipped tiny RM (``tiny``), the
    shipped SmolLM2 RM adapter (``smol``: :func:`~apt_course.reward_model.load_smol_reward_model`), or
    ``reward_model`` / the profile's ``reward_model`` (a Hub id, or a folder such as the RM chapter 05 trained
    and saved with ``save_pretrained``), loaded by :func:`~apt_course.reward_model.load_reward_model`."""
    from .checkpoints import checkpoint_path
    from .profiles import get_profile
    from .reward_model import load_reward_model

    profile = get_profile(profile) if isinstance(profile, str) else profile
    if profile.name == "smol" and not reward_model and not profile.reward_model:  # chapter 05's RM of SmolLM2
        from .reward_model import load_smol_reward_model

        rm, rm_tokenizer = load_smol_reward_model(device=device)
        return rm_reward_fn(rm.requires_grad_(False), rm_tokenizer)
    name = reward_model or profile.reward_model or checkpoint_path("rm")
    rm, rm_tokenizer = load_reward_model(name, device=device, dtype=dtype)
    return rm_reward_fn(rm.requires_grad_(False), rm_tokenizer)
