"""Chapter 09: Group Relative Policy Optimization (GRPO), from scratch.

For every prompt q, sample a *group* of G completions o_1..o_G from the current policy, score each with
reward functions a program computes (is the answer right? is the format right?), and let the group be
its own baseline: no value network, no reward model.

    A_i     = (r_i - mean(r_1..r_G)) / (std(r_1..r_G) + 1e-4)         group-normalised advantage
    ρ_{i,t} = π_θ(o_{i,t} | q, o_{i,<t}) / π_old(o_{i,t} | q, o_{i,<t})  importance ratio per token
    ℓ_{i,t} = -min(ρ_{i,t} A_i, clip(ρ_{i,t}, 1-ε, 1+ε_high) A_i) + β k3_{i,t}
    k3_{i,t} = exp(log π_ref - log π_θ) - (log π_ref - log π_θ) - 1        (≥ 0, unbiased for KL(π_θ‖π_ref))

(With ``kl_correction`` - TRL's ``use_bias_correction_kl``, on by default - the KL term is β ρ k3: the
ratio makes its gradient the unbiased gradient of the reverse KL, as in DeepSeek-V3.2.)

Every token of o_i shares its sequence's advantage. The per-token losses ℓ are aggregated in one of
three ways, with TRL's ``loss_type`` names and formulas (``trl/trainer/grpo_trainer.py``):

* ``"grpo"``    (1/B) Σ_i (1/|o_i|) Σ_t ℓ_{i,t}   - the paper's; long wrong answers are penalised less per token
* ``"dr_grpo"`` Σ_{i,t} ℓ_{i,t} / (B · L_max)    - Dr. GRPO: one constant normaliser, no length bias
* ``"dapo"``    Σ_{i,t} ℓ_{i,t} / Σ_i |o_i|       - DAPO: a mean over every token of the batch (TRL's default)

Reward functions follow TRL's convention ``fn(prompts, completions, **kwargs) -> list[float]``: they
are called with keyword arguments, ``kwargs`` holding one list per extra column of the prompt rows
(``answer=[...]``), so the same functions serve :func:`train_grpo` and ``trl.GRPOTrainer``.
"""

from __future__ import annotations

import inspect
import math
import random
import warnings
from dataclasses import dataclass

import torch

from .lm import completion_logprobs, format_prompts, generate, nanstd, prompt_rows, sample_groups
from .training import make_optimizer, optimizer_step, progress

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")


class RewardFunctionError(RuntimeError):
    """A reward function raised, or returned something that is not one number per completion."""


# ---------------------------------------------------------------- advantages, KL, loss

def group_advantages(rewards, group_size: int, scale: bool | str = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages, rewards laid out prompt by prompt (G consecutive entries per prompt).

        A_i = (r_i - mean_g r) / (std_g r + eps)   scale=True or "group" (std with Bessel's correction, as TRL)
        A_i = (r_i - mean_g r) / (std_batch r + eps)          scale="batch"
        A_i =  r_i - mean_g r                                  scale=False or "none" (Dr. GRPO)

    A NaN reward (an unscorable completion) is left out of its group's mean and std and gets A = 0.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32).flatten()
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2 (a group of one has no baseline), got {group_size!r}")
    if r.numel() == 0 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards do not split into groups of {group_size}: pass G rewards per prompt")
    mode = {True: "group", False: "none"}.get(scale, scale)
    if mode not in ("group", "batch", "none"):
        raise ValueError(f"scale must be True/'group', 'batch' or False/'none', got {scale!r}")
    groups = r.view(-1, group_size)
    mean = torch.nanmean(groups, dim=1, keepdim=True)
    adv = groups - mean
    if mode == "group":
        adv = adv / (nanstd(groups, dim=1) + eps)
    elif mode == "batch":
        adv = adv / (nanstd(r, dim=None) + eps)
    return torch.nan_to_num(adv, nan=0.0).flatten()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(π_θ‖π_ref) on tokens sampled from π_θ (Schulman, 2020):

        k3 = exp(log π_ref - log π_θ) - (log π_ref - log π_θ) - 1   (≥ 0, E_{π_θ}[k3] = KL)

    k1 = log π_θ - log π_ref is unbiased too but can be negative and is noisy; k3 has both virtues.
    """
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              ref_logp: torch.Tensor | None = None, beta: float = 0.0, epsilon: float = 0.2,
              epsilon_high: float | None = None, loss_type: str = "dapo",
              max_completion_length: int | None = None,
              kl_correction: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of the module docstring on a batch of B completions of T tokens.

    logp, old_logp, ref_logp, mask: (B, T) per-token log-probs (policy with grad, behaviour policy, frozen
    reference) and 1 on completion tokens; advantages: (B,). Returns the loss and its statistics: ``kl``
    (token mean of k3, when ref_logp is given), ``clip_fraction`` (tokens whose ratio was clipped in the
    direction the advantage pushes), ``ratio`` (token mean of ρ).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if beta and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's log-probs): pass them or set beta=0")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    adv = advantages.view(-1, 1).to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * adv)
    kl = kl_k3(logp, ref_logp) if ref_logp is not None else None
    if beta:
        per_token = per_token + beta * (kl * ratio if kl_correction else kl)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.size(0) * (max_completion_length or per_token.size(1)))
    else:  # dapo
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {"clip_fraction": ((clipped * mask).sum() / n).item(), "ratio": ((ratio * mask).sum() / n).item(),
                 "kl": ((kl * mask).sum() / n).item() if kl is not None else float("nan")}
    return loss, stats


# ---------------------------------------------------------------- reward functions

def check_reward_functions(reward_fns, columns=()) -> list[tuple[str, callable]]:
    """Validate reward functions up front: TRL's ``fn(prompts, completions, **kwargs) -> list[float]``.

    Each is called with keyword arguments ``prompts=``, ``completions=``, ``completion_ids=`` and one list
    per column of the prompt rows, so it must take ``**kwargs`` and require no other argument.
    Returns ``[(name, fn), ...]``.
    """
    if callable(reward_fns):
        reward_fns = [reward_fns]
    reward_fns = list(reward_fns or [])
    if not reward_fns:
        raise ValueError("no reward functions: pass at least one fn(prompts, completions, **kwargs) -> list[float]")
    passed = {"prompts", "completions", "completion_ids", *columns}
    out = []
    for fn in reward_fns:
        name = getattr(fn, "__name__", type(fn).__name__)
        if not callable(fn):
            raise TypeError(f"reward function {fn!r} is not callable: pass functions, e.g. [correctness_reward]")
        params = inspect.signature(fn).parameters.values()
        fix = (f"write it as `def {name}(prompts, completions, **kwargs) -> list[float]` (TRL's convention; "
               "extra columns of the prompt rows, e.g. answer, arrive as keyword lists)")
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            raise TypeError(f"reward function {name!r}{inspect.signature(fn)} takes no **kwargs: {fix}")
        for p in params:
            if p.kind is p.POSITIONAL_ONLY or (p.kind is p.VAR_POSITIONAL):
                raise TypeError(f"reward function {name!r} has positional-only parameter {p.name!r}: "
                                f"it is called with keyword arguments; {fix}")
            if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY:
                if p.default is p.empty and p.name not in passed:
                    raise TypeError(f"reward function {name!r} requires argument {p.name!r}, which is neither "
                                    f"prompts/completions nor a column of the prompt rows ({sorted(columns)}); {fix}")
        out.append((name, fn))
    return out


def score_completions(reward_fns, prompts: list, completions: list, columns: dict | None = None,
                      weights: list[float] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Call every reward function once on the batch; returns ``(total, per_function)``: (N,) and (N, F).

    ``total`` is the weighted sum over functions, NaN (None) entries skipped; a completion every function
    declined to score stays NaN (it will get advantage 0). A function that raises is re-run sample by
    sample to name the sample that breaks it; a NaN or None is reported with a warning naming both.
    """
    columns = columns or {}
    fns = check_reward_functions(reward_fns, columns)
    weights = [1.0] * len(fns) if weights is None else list(weights)
    if len(weights) != len(fns):
        raise ValueError(f"{len(weights)} reward weights for {len(fns)} reward functions: give one weight each")
    n = len(completions)
    per_fn = torch.zeros(n, len(fns))
    for j, (name, fn) in enumerate(fns):
        try:
            values = fn(prompts=prompts, completions=completions, **columns)
        except Exception as e:
            i = _first_failing_sample(fn, prompts, completions, columns)
            where = (f" on sample {i}: prompt={prompts[i]!r}, completion={completions[i]!r}" if i is not None else "")
            raise RewardFunctionError(
                f"reward function {name!r} raised {type(e).__name__}: {e}{where}. A reward function should "
                "return a number for every completion (e.g. 0.0 for a malformed one), never raise.") from e
        try:
            values = [float("nan") if v is None else float(v) for v in values]
        except (TypeError, ValueError):
            raise RewardFunctionError(f"reward function {name!r} must return a list of numbers, one per "
                                      f"completion; it returned {str(values)[:200]}") from None
        if len(values) != n:
            raise RewardFunctionError(f"reward function {name!r} returned {len(values)} rewards for {n} "
                                      "completions: return exactly one per completion")
        bad = [i for i, v in enumerate(values) if math.isnan(v) or math.isinf(v)]
        if bad:
            i = bad[0]
            warnings.warn(f"reward function {name!r} returned {values[i]} (NaN/None/inf) for {len(bad)} of {n} "
                          f"completions, first sample {i}: prompt={prompts[i]!r}, completion={completions[i]!r}. "
                          "They are left out of the group baseline and get advantage 0.", RuntimeWarning,
                          stacklevel=2)
            for i in bad:
                values[i] = float("nan")
        per_fn[:, j] = torch.tensor(values)
    w = torch.tensor(weights, dtype=torch.float32)
    total = torch.nansum(per_fn * w, dim=1)
    total[torch.isnan(per_fn).all(dim=1)] = float("nan")
    return total, per_fn


def _first_failing_sample(fn, prompts, completions, columns):
    for i in range(len(completions)):
        try:
            fn(prompts=[prompts[i]], completions=[completions[i]], **{k: [v[i]] for k, v in columns.items()})
        except Exception:
            return i
    return None


# ---------------------------------------------------------------- the trainer

@dataclass
class GRPOConfig:
    """Settings of :func:`train_grpo` (names follow ``trl.GRPOConfig`` where one exists).

    steps: optimiser updates (each on a fresh batch of rollouts). prompts_per_step: prompts per batch.
    group_size: G completions per prompt (TRL: num_generations; >= 2). lr: learning rate (AdamW, cosine).
    beta: weight of the k3 KL penalty to the reference (0 = no leash, no reference forward needed for the
    loss; the KL is still logged when a reference model is given). epsilon, epsilon_high: clip range
    [1-ε, 1+ε_high] (DAPO raises ε_high to 0.28). loss_type: "grpo", "dr_grpo" or "dapo" (module doc).
    scale_rewards: True/"group", "batch" or False/"none" (Dr. GRPO does not divide by the std).
    num_iterations: gradient steps per batch of rollouts (μ; > 1 makes the ratio and its clip matter).
    kl_correction: multiply the KL term by the ratio (TRL's use_bias_correction_kl; only matters when beta > 0).
    temperature: sampling temperature (log-probs use the same). max_new_tokens: completion length cap
    (= max_completion_length of dr_grpo). reward_weights: one per reward function (default 1 each).
    max_grad_norm: gradient clipping. seed: prompt order and sampling. log_every: history resolution.
    """

    steps: int = 40
    prompts_per_step: int = 16
    group_size: int = 8
    lr: float = 1e-4
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    loss_type: str = "dapo"
    scale_rewards: bool | str = True
    num_iterations: int = 1
    kl_correction: bool = True
    temperature: float = 1.0
    max_new_tokens: int = 12
    reward_weights: list[float] | None = None
    warmup: int = 0
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 1

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO compares completions within a group), got {self.group_size}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        for name in ("steps", "prompts_per_step", "num_iterations", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.beta < 0 or self.temperature <= 0:
            raise ValueError(f"need beta >= 0 and temperature > 0, got beta={self.beta}, temperature={self.temperature}")


HISTORY_KEYS = ("step", "reward_mean", "reward_std", "frac_zero_std", "completion_length", "kl", "clip_fraction",
                "loss", "truncated", "nan_rewards")


def score_groups(fns, rows: list[dict], idx: list[int], G: int, completions: list[str], columns: list[str],
                 weights=None) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    """The rewards of ``G`` completions for each of ``rows[idx]`` (in that order): ``(group_rows, total, per_fn)``,
    ``group_rows`` being each completion's row; the extra ``columns`` of the rows reach the reward functions."""
    group_rows = [rows[i] for i in idx for _ in range(G)]
    total, per_fn = score_completions(fns, [r["prompt"] for r in group_rows], completions,
                                      {c: [r[c] for r in group_rows] for c in columns}, weights)
    return group_rows, total, per_fn


def train_grpo(model, ref_model, tokenizer, prompts, reward_fns, config: GRPOConfig = GRPOConfig(),
               eval_fn=None, eval_every: int = 10) -> dict:
    """Train ``model`` with GRPO on ``prompts`` scored by ``reward_fns``; returns the history dict.

    prompts: strings or rows ``{"prompt": ..., <columns the reward functions read>}``; ref_model: the
    frozen reference (needed when ``config.beta > 0``; when given, the KL is logged either way).
    History (one entry per logged step): reward mean and std over the batch, the fraction of groups whose
    rewards all tie (no signal), completion length, KL to the reference, clip fraction, the loss, the
    fraction of truncated completions, and ``reward/<fn>`` for every reward function. ``eval_fn(model) -> dict``
    (optional, as in chapter 06's ``train_rlhf``) is called before step 0, every ``eval_every`` steps and at the
    end, into ``history["eval"]`` (``{"step": ..., **eval_fn(model)}``), without touching the optimiser.
    """
    if eval_fn is not None and eval_every < 1:
        raise ValueError(f"eval_every must be >= 1 when an eval_fn is given, got {eval_every}")
    rows = prompt_rows(prompts)
    columns = [k for k in rows[0] if k != "prompt"]
    fns = check_reward_functions(reward_fns, columns)
    if config.beta > 0 and ref_model is None:
        raise ValueError("config.beta > 0 needs a frozen ref_model (e.g. a copy of the starting model)")
    if ref_model is not None:
        ref_model.eval().requires_grad_(False)
    texts = format_prompts(tokenizer, rows)
    G = config.group_size
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    opt, sched = make_optimizer(model, config.lr, config.steps * config.num_iterations, config.warmup)
    history = {k: [] for k in HISTORY_KEYS} | {f"reward/{name}": [] for name, _ in fns}
    if eval_fn is not None:
        history["eval"] = []

    def evaluate(step):
        model.eval()
        history["eval"].append({"step": step, **eval_fn(model)})
        model.train()

    model.train()
    for step in progress(range(config.steps), "GRPO"):
        if eval_fn is not None and step % eval_every == 0:
            evaluate(step)
        idx = rng.sample(range(len(rows)), min(config.prompts_per_step, len(rows)))
        batch = sample_groups(model, tokenizer, [texts[i] for i in idx], G, config.max_new_tokens, config.temperature)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, total, per_fn = score_groups([f for _, f in fns], rows, idx, G, batch["texts"], columns,
                                            config.reward_weights)
        for w in caught:
            warnings.warn(f"step {step}: {w.message}", w.category, stacklevel=2)
        adv = group_advantages(total, G, config.scale_rewards)
        with torch.no_grad():
            ref_logp = completion_logprobs(ref_model, batch, "none", config.temperature) if ref_model is not None else None
            old_logp = completion_logprobs(model, batch, "none", config.temperature) if config.num_iterations > 1 else None
        for _ in range(config.num_iterations):
            logp = completion_logprobs(model, batch, "none", config.temperature)
            loss, stats = grpo_loss(logp, logp.detach() if old_logp is None else old_logp, adv.to(logp.device),
                                    batch["completion_mask"], ref_logp, config.beta, config.epsilon,
                                    config.epsilon_high, config.loss_type, config.max_new_tokens,
                                    config.kl_correction)
            optimizer_step(loss, model, opt, sched, config.max_grad_norm)
        if step % config.log_every == 0 or step == config.steps - 1:
            std_g = nanstd(total.view(-1, G), dim=1).nan_to_num(0.0)
            history["step"].append(step)
            history["reward_mean"].append(torch.nanmean(total).item())
            history["reward_std"].append(nanstd(total, None).item())
            history["frac_zero_std"].append((std_g < 1e-6).float().mean().item())
            history["completion_length"].append(batch["completion_mask"].sum(1).float().mean().item())
            history["kl"].append(stats["kl"])
            history["clip_fraction"].append(stats["clip_fraction"])
            history["loss"].append(loss.item())
            history["truncated"].append(batch["truncated"].float().mean().item())
            history["nan_rewards"].append(torch.isnan(per_fn).any(1).float().mean().item())
            for j, (name, _) in enumerate(fns):
                history[f"reward/{name}"].append(torch.nanmean(per_fn[:, j]).item())
    if eval_fn is not None:
        evaluate(config.steps)
    return history


# ---------------------------------------------------------------- the baseline: expert iteration

@dataclass
class ExpertIterationConfig:
    """Settings of :func:`expert_iteration`. rounds: sample-filter-fine-tune rounds; prompts_per_round and
    group_size: the samples of a round (rounds × prompts_per_round × group_size = GRPO's steps ×
    prompts_per_step × group_size for an equal sampling budget); threshold: the total reward a sample needs to be
    kept; sft_steps, batch_size, lr, warmup: each round's fine-tune (chapter 04's ``train_sft``)."""

    rounds: int = 2
    prompts_per_round: int = 160
    group_size: int = 8
    threshold: float = 1.0
    sft_steps: int = 10
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 0
    temperature: float = 1.0
    max_new_tokens: int = 12
    reward_weights: list[float] | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("rounds", "prompts_per_round", "group_size", "sft_steps", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def expert_iteration(model, tokenizer, prompts, reward_fns, config: ExpertIterationConfig = ExpertIterationConfig()
                     ) -> dict:
    """Expert iteration, or rejection-sampling fine-tuning (Anthony et al. 2017; STaR, Zelikman et al. 2022): each
    round samples G completions per prompt from the current model, keeps those whose reward reaches the threshold
    τ, and fine-tunes on them with chapter 04's SFT loss,

        θ ← θ - η ∇_θ [ -(1/|K|) Σ_{(q, o) ∈ K} log π_θ(o | q) ],   K = {(q, o_i) : r(q, o_i) ≥ τ}.

    GRPO's samples with the wrong ones thrown away instead of pushed down: the baseline that tells whether RL's
    negative advantages earn their keep. Returns ``{"round", "samples", "kept", "reward_mean", "loss"}`` per round.
    """
    from .sft import SFTConfig, train_sft  # chapter 04's trainer: expert iteration is SFT on filtered samples

    rows = prompt_rows(prompts)
    columns = [k for k in rows[0] if k != "prompt"]
    fns = [f for _, f in check_reward_functions(reward_fns, columns)]
    texts = format_prompts(tokenizer, rows)
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    G = config.group_size
    history = {"round": [], "samples": [], "kept": [], "reward_mean": [], "loss": []}
    for r in range(config.rounds):
        idx = rng.sample(range(len(rows)), min(config.prompts_per_round, len(rows)))
        batch = sample_groups(model, tokenizer, [texts[i] for i in idx], G, config.max_new_tokens, config.temperature)
        group_rows, total, _ = score_groups(fns, rows, idx, G, batch["texts"], columns, config.reward_weights)
        keep = [{"prompt": g["prompt"], "completion": t, **({"system": g["system"]} if g.get("system") else {})}
                for g, t, x in zip(group_rows, batch["texts"], total.tolist()) if x >= config.threshold and t.strip()]
        loss = float("nan")
        if keep:  # a round with no sample good enough leaves the model as it was
            h = train_sft(model, tokenizer, keep, SFTConfig(steps=config.sft_steps, batch_size=config.batch_size,
                                                            lr=config.lr, warmup=config.warmup, seed=config.seed + r))
            loss = h["loss"][-1]
        history["round"].append(r)
        history["samples"].append(len(group_rows))
        history["kept"].append(len(keep))
        history["reward_mean"].append(torch.nanmean(total).item())
        history["loss"].append(loss)
    return history


# ---------------------------------------------------------------- measuring

def greedy_accuracy(model, tokenizer, rows: list[dict], checker, max_new_tokens: int = 12) -> float:
    """Fraction of rows whose greedy answer passes ``checker(row, completion)``; prompts go through the
    tokenizer's own chat template (so a real model on the GPU profile is prompted its way)."""
    rows = prompt_rows(rows)
    outs = generate(model, tokenizer, format_prompts(tokenizer, rows), max_new_tokens=max_new_tokens)
    return sum(bool(checker(r, o)) for r, o in zip(rows, outs)) / len(rows)


def graded_replies(model, tokenizer, rows: list[dict], checker, max_new_tokens: int = 12) -> dict:
    """Greedy replies to ``rows``, graded three ways: by ``checker(row, reply)`` (the task's own grader, ``acc``),
    by strict parsing (the reply is the answer and nothing else: :func:`~apt_course.rewards.strict_correct`) and by
    lenient parsing (the answer can be found in it: :func:`~apt_course.rewards.lenient_correct`).
    Returns ``{"acc", "strict", "lenient", "replies"}``; ``acc`` equals :func:`greedy_accuracy`'s."""
    from .rewards import lenient_correct, strict_correct

    rows = prompt_rows(rows)
    replies = generate(model, tokenizer, format_prompts(tokenizer, rows), max_new_tokens=max_new_tokens)
    n = len(rows)
    return {"acc": sum(bool(checker(r, o)) for r, o in zip(rows, replies)) / n,
            "strict": sum(strict_correct(o, r["answer"]) for r, o in zip(rows, replies)) / n,
            "lenient": sum(lenient_correct(o, r["answer"]) for r, o in zip(rows, replies)) / n,
            "replies": replies}


def sample_hits(model, tokenizer, examples: list[dict], n: int, checker, temperature: float = 1.0,
                max_new_tokens: int = 12, seed: int = 0) -> torch.Tensor:
    """``(len(examples), n)`` 0/1 tensor: which of ``n`` samples per prompt at ``temperature`` the checker accepts."""
    if not examples:
        raise ValueError("no examples to sample")
    rows = prompt_rows(examples)
    torch.manual_seed(seed)
    outs = generate(model, tokenizer, format_prompts(tokenizer, rows), max_new_tokens=max_new_tokens, do_sample=True,
                    temperature=temperature, num_return_sequences=n)
    return torch.tensor([checker(ex, outs[i * n + j]) for i, ex in enumerate(examples) for j in range(n)],
                        dtype=torch.float32).view(-1, n)


def unbiased_pass_at_k(hits: torch.Tensor, k: int) -> float:
    """Chen et al. (2021)'s unbiased pass@k from ``n`` samples per prompt, ``c`` of them correct:
    ``pass@k = mean over prompts of 1 - C(n - c, k) / C(n, k)`` (the chance that k of the n samples, drawn without
    replacement, hold at least one correct one); ``k <= n``."""
    n = hits.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in 1..{n} (the samples per prompt), got {k}")
    c = hits.sum(1).long().tolist()
    return sum(1.0 - (math.comb(n - ci, k) / math.comb(n, k)) for ci in c) / len(c)


def pass_at_k(model, tokenizer, examples: list[dict], k: int, checker, temperature: float = 1.0,
              max_new_tokens: int = 12, seed: int = 0) -> tuple[float, float]:
    """``(mean accuracy of a sample, pass@k)``: k samples per prompt at ``temperature``; pass@k is the
    fraction of prompts with at least one correct sample. A large gap between the two is what GRPO turns
    into greedy accuracy: the right answer is already in the model's samples, just not on top."""
    hits = sample_hits(model, tokenizer, examples, k, checker, temperature, max_new_tokens, seed)
    return hits.mean().item(), unbiased_pass_at_k(hits, k)  # with n = k samples: the share of prompts with a hit
