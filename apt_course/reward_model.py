"""Chapter 05 core: a reward model trained on preference pairs with the Bradley–Terry loss.

The reward model (RM) is the SFT language model with its LM head swapped for a scalar head:
``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`` (for Llama,
``LlamaForSequenceClassification``). It reads ``prompt + completion + <eos>`` and its reward is the head's
score at the last non-pad token — the same model class TRL's ``RewardTrainer`` trains, so the two agree.

Bradley–Terry: P(chosen ≻ rejected) = σ(r_chosen − r_rejected); training minimises −log of it.

Public API (chapter 06 imports it): :func:`load_reward_model`, :func:`bradley_terry_loss`,
:class:`RewardConfig`, :func:`train_reward_model`, :func:`score`, :func:`reward_accuracy`,
:func:`hacked_response` (the response the tiny RM over-scores, see :data:`HACK`).
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .data import to_trl_preference_dataset, validate_pairs
from .lm import MAX_LENGTH
from .model import load_reward_model  # noqa: F401  (part of this chapter's API; lives with the other loaders)
from .tokenizer import format_prompt
from .training import make_optimizer, optimizer_step, progress

# ---------------------------------------------------------------- model and inputs


def reward_batch(tokenizer, prompts, completions, systems=None, device="cpu",
                 max_length: int | None = MAX_LENGTH) -> dict[str, torch.Tensor]:
    """Tokenise ``prompt + completion + <eos>`` for each pair (right-padded). A row longer than
    ``max_length`` tokens loses tokens from its **start**: the reward is read at the end, so the end stays."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: they must pair up")
    if not prompts:
        raise ValueError("empty batch: pass at least one prompt/completion")
    systems = systems or [None] * len(prompts)
    texts = [format_prompt(tokenizer, p, s) + str(c) + tokenizer.eos_token
             for p, c, s in zip(prompts, completions, systems)]
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False,
                        truncation=max_length is not None, max_length=max_length)
    finally:
        tokenizer.truncation_side = side
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def rewards(rm, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """r(x, y) for each row: the scalar head at the last non-pad token, shape (B,)."""
    return rm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1).float()


@torch.no_grad()
def score(rm, tokenizer, prompts, completions, systems=None, batch_size: int = 256) -> torch.Tensor:
    """Rewards of completions to prompts (plain user texts; the chat template is applied here), shape (N,)."""
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    out = []
    try:
        for i in range(0, len(prompts), batch_size):
            sl = slice(i, i + batch_size)
            out.append(rewards(rm, reward_batch(tokenizer, prompts[sl], completions[sl],
                                                systems[sl] if systems else None, device)).cpu())
    finally:
        rm.train(was_training)
    return torch.cat(out)


# ---------------------------------------------------------------- the loss and the trainer


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coefficient: float | None = None) -> torch.Tensor:
    """L = −mean log σ(r_chosen − r_rejected − margin)  [+ c · mean (r_chosen + r_rejected)²].

    ``margin`` (default 0) asks for a minimum gap; ``center_coefficient`` c keeps rewards near zero
    (TRL's ``center_rewards_coefficient``; None = off, TRL's default).
    """
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(f"r_chosen {tuple(r_chosen.shape)} and r_rejected {tuple(r_rejected.shape)} must match")
    diff = r_chosen - r_rejected - (margin if margin is not None else 0.0)
    loss = -F.logsigmoid(diff).mean()
    if center_coefficient is not None:
        loss = loss + center_coefficient * ((r_chosen + r_rejected) ** 2).mean()
    return loss


@dataclass
class RewardConfig:
    """Settings of :func:`train_reward_model`.

    steps: optimiser steps; batch_size: pairs per step; lr: peak learning rate (warm-up ``warmup``, cosine);
    center_coefficient: optional reward-centring term (see :func:`bradley_terry_loss`); seed: pair order.
    """

    steps: int = 150
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 10
    weight_decay: float = 0.0
    center_coefficient: float | None = None
    seed: int = 0
    log_every: int = 5


def train_reward_model(model, tokenizer, pairs: list[dict], config: RewardConfig = RewardConfig()) -> dict:
    """Train the RM on ``{"prompt", "chosen", "rejected"}`` pairs with the Bradley–Terry loss.

    Each step scores chosen and rejected in one batch, ``[chosen; rejected]``, as TRL does. Returns the
    history ``{"step", "loss", "acc", "margin"}`` (acc and margin of the training batch).
    """
    pairs = validate_pairs(pairs, "reward-model training data")
    device = next(model.parameters()).device
    rng = random.Random(config.seed)
    opt, sched = make_optimizer(model, config.lr, config.steps, config.warmup, config.weight_decay)
    history = {"step": [], "loss": [], "acc": [], "margin": []}
    model.train()
    for step in progress(range(config.steps), "reward model"):
        batch_pairs = rng.sample(pairs, min(config.batch_size, len(pairs)))
        n = len(batch_pairs)
        prompts = [p["prompt"] for p in batch_pairs] * 2
        systems = [p.get("system") for p in batch_pairs] * 2
        completions = [p["chosen"] for p in batch_pairs] + [p["rejected"] for p in batch_pairs]
        r = rewards(model, reward_batch(tokenizer, prompts, completions, systems, device))
        loss = bradley_terry_loss(r[:n], r[n:], center_coefficient=config.center_coefficient)
        optimizer_step(loss, model, opt, sched)
        if step % config.log_every == 0 or step == config.steps - 1:
            diff = (r[:n] - r[n:]).detach()
            history["step"].append(step)
            history["loss"].append(loss.item())
            history["acc"].append((diff > 0).float().mean().item())
            history["margin"].append(diff.mean().item())
    return history


def reward_margins(rm, tokenizer, pairs: list[dict]) -> torch.Tensor:
    """r(chosen) − r(rejected) for each pair (positive = the RM agrees with the label)."""
    pairs = validate_pairs(pairs)
    prompts, systems = [p["prompt"] for p in pairs], [p.get("system") for p in pairs]
    chosen = score(rm, tokenizer, prompts, [p["chosen"] for p in pairs], systems)
    rejected = score(rm, tokenizer, prompts, [p["rejected"] for p in pairs], systems)
    return chosen - rejected


def reward_accuracy(rm, tokenizer, pairs: list[dict]) -> float:
    """Fraction of pairs the RM ranks right: r(chosen) > r(rejected)."""
    return (reward_margins(rm, tokenizer, pairs) > 0).double().mean().item()


# ---------------------------------------------------------------- reward hacking

HACK = "a wrong answer followed by a friendly phrase (', nice to meet you!')"
POLITE_SUFFIX = ", nice to meet you!"


def hacked_response(prompt_record: dict) -> str:
    """A response the tiny RM over-scores: a WRONG answer dressed up with a friendly phrase.

    The RM saw friendly phrases only in chosen responses (polite vs rude pairs) and never on a wrong answer,
    so it learns "friendly => good" as well as "correct => good" and often ranks ``"9, nice to meet you!"``
    above the bare correct ``"8"`` (for the shipped ``rm`` on most held-out tasks: chapter 05 measures the rate). ``prompt_record`` is a tiny-world task (``prompt`` and ``answer``). Chapter 06 uses
    this to show a policy optimising the RM learning the phrase instead of the task.
    """
    from .world import _wrong_answer

    if "answer" not in prompt_record or "prompt" not in prompt_record:
        raise KeyError(f"need a tiny-world task with 'prompt' and 'answer'; got {sorted(prompt_record)}")
    rng = random.Random(f"hack:{prompt_record['prompt']}")
    task = prompt_record.get("task") or prompt_record["prompt"].split(" ", 1)[0]
    wrong = _wrong_answer({"task": task, "answer": prompt_record["answer"]}, rng)
    return wrong + POLITE_SUFFIX


def hack_rate(rm, tokenizer, records: list[dict], make_hack=hacked_response) -> float:
    """Fraction of tasks where the hacked (wrong) response outscores the correct answer."""
    prompts = [r["prompt"] for r in records]
    correct = score(rm, tokenizer, prompts, [r["answer"] for r in records])
    hacked = score(rm, tokenizer, prompts, [make_hack(r) for r in records])
    return (hacked > correct).double().mean().item()


# ---------------------------------------------------------------- the same pairs through TRL


def to_trl_reward_dataset(pairs: list[dict], tokenizer):
    """Pairs in TRL's explicit-prompt format with the chat template applied: ``{"prompt", "chosen",
    "rejected"}`` strings (TRL appends EOS and tokenises prompt + completion, as :func:`reward_batch` does)."""
    return to_trl_preference_dataset(pairs, tokenizer)


@dataclass
class TRLRewardConfig:
    """Settings of :func:`run_trl_reward` (mapped onto ``trl.RewardConfig``); extra: any other field."""

    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 10
    center_coefficient: float | None = None
    seed: int = 0
    log_every: int = 5
    extra: dict = field(default_factory=dict)


def make_trl_reward_trainer(model, tokenizer, pairs: list[dict], config: TRLRewardConfig = TRLRewardConfig()):
    """A ``trl.RewardTrainer`` on the same pairs, quiet and CPU-friendly."""
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    args = TrlRewardConfig(
        output_dir=os.path.join(tempfile.gettempdir(), "apt_course_trl_rm"), max_steps=config.steps,
        per_device_train_batch_size=config.batch_size, learning_rate=config.lr, warmup_steps=config.warmup,
        lr_scheduler_type="cosine", seed=config.seed, logging_steps=config.log_every,
        center_rewards_coefficient=config.center_coefficient, save_strategy="no", report_to="none",
        use_cpu=next(model.parameters()).device.type == "cpu", dataloader_num_workers=0,
        disable_tqdm=os.environ.get("APT_COURSE_QUIET") == "1", **config.extra,
    )
    return RewardTrainer(model=model, args=args, train_dataset=to_trl_reward_dataset(pairs, tokenizer),
                         processing_class=tokenizer)


def run_trl_reward(model, tokenizer, pairs: list[dict], config: TRLRewardConfig = TRLRewardConfig()):
    """Train with TRL's ``RewardTrainer``; returns ``(model, history {"step", "loss", "acc"})``."""
    trainer = make_trl_reward_trainer(model, tokenizer, pairs, config)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    history = {"step": [r["step"] for r in logs], "loss": [r["loss"] for r in logs],
               "acc": [r.get("accuracy", float("nan")) for r in logs]}
    return trainer.model, history
