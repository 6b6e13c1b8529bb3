"""Chapter 08: ORPO, odds-ratio preference optimisation: SFT and preference learning in one stage, no reference.

With P(y|x) = exp(mean_t log π(y_t | x, y_<t)) (the length-normalised likelihood) and odds(y|x) = P / (1 - P),

    L_ORPO = L_NLL(y_w) - β · mean log σ( log odds(y_w|x) - log odds(y_l|x) )

The NLL term is ordinary SFT on the chosen answers; the odds-ratio term pushes the rejected answer's odds
below the chosen one's. There is no reference model, so one model, one optimiser and one forward pass (chosen
and rejected rows together) per step. TRL's ``trl.experimental.orpo.ORPOTrainer`` computes the same loss
(its ``beta`` is the paper's λ); it takes the NLL over the prompt tokens too, which ``nll_on_prompt=True`` reproduces.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import validate_pairs
from .lm import build_pair_batch, completion_token_logprobs
from .training import make_optimizer, optimizer_step, progress


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, computed stably (Mächler's two branches around x = -log 2), with a value and
    gradient that stay finite and right all the way to x = 0.

    Each branch only ever sees inputs where it is stable: the other branch's inputs are swapped for a harmless
    constant *before* it runs. (``torch.where`` differentiates both branches; an infinite derivative in the
    unselected one, times 0, is NaN - the bug this guards against, e.g. log1p(-exp(-1e-9)) in float32.)
    At x = 0 the true value is -inf (a certain answer has infinite odds); x is clamped to the largest value
    below 0 of its dtype's normal range, -finfo.tiny (log 1.2e-38 ≈ -87 in float32), so it stays finite.
    """
    if torch.any(x > 0) or torch.any(torch.isnan(x)):
        raise ValueError("log1mexp needs x <= 0 (a log-probability), got a positive value or NaN")
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -math.log(2)
    safe_near = torch.where(near_zero, x, torch.full_like(x, -1.0))  # the expm1 branch sees x in (-log 2, 0)
    safe_far = torch.where(near_zero, torch.full_like(x, -1.0), x)   # the log1p branch sees x <= -log 2
    return torch.where(near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def log_odds_ratio(avg_c: torch.Tensor, avg_r: torch.Tensor) -> torch.Tensor:
    """log odds(y_w) - log odds(y_l),  log odds(y) = log P - log(1 - P),  log P = mean token log-prob."""
    return (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))


def orpo_loss(nll: torch.Tensor, avg_c: torch.Tensor, avg_r: torch.Tensor, beta: float):
    """L = nll - β · mean log σ(log odds ratio).  Returns ``(loss, or_term, log_odds)``, or_term = -mean log σ(.).

    β is the paper's λ (TRL's name, ``ORPOConfig.beta``)."""
    if not beta >= 0:
        raise ValueError(f"beta (the weight of the odds-ratio term, the paper's λ) must be >= 0, got {beta!r}")
    log_odds = log_odds_ratio(avg_c.float(), avg_r.float())
    or_term = -F.logsigmoid(log_odds).mean()
    return nll + beta * or_term, or_term.detach(), log_odds.detach()


def orpo_batch_loss(model, batch: dict[str, torch.Tensor], beta: float, nll_on_prompt: bool = False):
    """ORPO on a pair batch (chosen rows, then rejected rows): one forward pass for both halves."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token, mask = completion_token_logprobs(logits, batch, everywhere=nll_on_prompt)
    mask = mask.float()
    avg = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    avg_c, avg_r = avg.chunk(2)
    nll_mask = (batch["attention_mask"][:, 1:].float() if nll_on_prompt else mask).chunk(2)[0]
    nll = -(per_token.chunk(2)[0] * nll_mask).sum() / nll_mask.sum()
    loss, or_term, log_odds = orpo_loss(nll, avg_c, avg_r, beta)
    stats = {"nll": nll.item(), "or_loss": or_term.item(), "log_odds": log_odds.mean().item(),
             "logp_chosen": avg_c.mean().item(), "logp_rejected": avg_r.mean().item(),
             "reward_acc": (avg_c > avg_r).float().mean().item()}
    return loss, stats


@dataclass
class ORPOConfig:
    """Settings of :func:`train_orpo` (the from-scratch twin of ``trl.experimental.orpo.ORPOConfig``).

    beta: the weight of the odds-ratio term (the paper's λ; TRL's name; the paper uses 0.1 to 1);
    steps, batch_size (pairs per step), lr, warmup, weight_decay: AdamW with warm-up then cosine
    (an SFT-sized learning rate, since ORPO does the SFT too); nll_on_prompt: take the NLL over prompt and
    answer as TRL does (default: the answer only, as in the paper); seed: batch order; log_every.
    """

    beta: float = 0.5
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.0
    nll_on_prompt: bool = False
    seed: int = 0
    log_every: int = 10

    def __post_init__(self):
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")


def train_orpo(model, tokenizer, pairs: list[dict], config: ORPOConfig = ORPOConfig()) -> dict:
    """One-stage ORPO on preference pairs. Returns the history: step, loss, nll, or_loss, log_odds,
    logp_chosen / logp_rejected (mean token log-probs), reward_acc, seconds."""
    validate_pairs(pairs)
    device = next(model.parameters()).device
    rng = random.Random(config.seed)
    opt, sched = make_optimizer(model, config.lr, config.steps, config.warmup, config.weight_decay)
    keys = ("nll", "or_loss", "log_odds", "logp_chosen", "logp_rejected", "reward_acc")
    history = {"step": [], "loss": [], **{k: [] for k in keys}, "seconds": 0.0}
    start = time.perf_counter()
    model.train()
    for step in progress(range(config.steps), "ORPO"):
        idx = rng.sample(range(len(pairs)), min(config.batch_size, len(pairs)))
        batch = build_pair_batch(tokenizer, [pairs[i] for i in idx], device)
        loss, stats = orpo_batch_loss(model, batch, config.beta, config.nll_on_prompt)
        loss_value = optimizer_step(loss, model, opt, sched, max_grad_norm=1.0)
        if step % config.log_every == 0 or step == config.steps - 1:
            history["step"].append(step)
            history["loss"].append(loss_value)
            for k in keys:
                history[k].append(stats[k])
    history["seconds"] = time.perf_counter() - start
    model.eval()
    return history


def training_state_bytes(model, optimizer_states: int = 2, reference=None) -> dict:
    """Memory a trainer holds besides activations, from counts: weights + gradients + AdamW's
    ``optimizer_states`` tensors per weight (+ a frozen reference's weights). Bytes per element from dtypes."""
    params = [p for p in model.parameters()]
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    ref = sum(p.numel() * p.element_size() for p in reference.parameters()) if reference is not None else 0
    out = {"weights": weights, "gradients": trainable, "optimizer": optimizer_states * trainable, "reference": ref}
    out["total"] = sum(out.values())
    return out
