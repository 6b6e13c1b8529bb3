"""Pieces every from-scratch training loop shares: the optimiser with its schedule, and progress."""

from __future__ import annotations

import math
import os

import torch
from tqdm.auto import tqdm


def make_optimizer(model: torch.nn.Module, lr: float, steps: int, warmup: int = 0, weight_decay: float = 0.0):
    """AdamW over the trainable parameters, with linear warm-up then cosine decay to 10 % of ``lr``."""
    if lr <= 0 or steps < 1:
        raise ValueError(f"need lr > 0 and steps >= 1, got lr={lr}, steps={steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (all requires_grad=False)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class NonFiniteError(FloatingPointError):
    """A loss or gradient was NaN or infinite: the update was refused, so the weights were left as they were."""


def optimizer_step(loss: torch.Tensor, model: torch.nn.Module, opt, sched=None, max_grad_norm: float | None = 1.0) -> float:
    """One update: clear the gradients, back-propagate ``loss``, clip the global gradient norm to
    ``max_grad_norm`` (None: no clipping), step the optimiser and the schedule. Returns ``loss.item()``.

    A NaN or infinite loss or gradient norm stops training with :class:`NonFiniteError` *before* the optimiser
    steps (clipping a NaN norm would still write NaN into every weight): the model keeps its last good weights.
    """
    step = getattr(opt, "apt_steps", 0)
    advice = ("Try a lower learning rate, a smaller beta, or gradient clipping (max_grad_norm); check the data for "
              "empty completions and the loss for log(0).")
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteError(f"update {step}: the loss is {loss.item()}, not a finite number; the model was not "
                             f"changed. {advice}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm is not None else float("inf"))
    if not torch.isfinite(norm):
        opt.zero_grad(set_to_none=True)
        raise NonFiniteError(f"update {step}: the gradient norm is {norm.item()} (loss {loss.item():.4g}); the update "
                             f"was refused and the model keeps its last weights. {advice}")
    opt.step()
    opt.apt_steps = step + 1
    if sched is not None:
        sched.step()
    return loss.item()


def progress(iterable, desc: str, total: int | None = None, disable: bool | None = None):
    """A tqdm progress bar (quiet when ``APT_COURSE_QUIET=1``, e.g. in CI logs)."""
    if disable is None:
        disable = os.environ.get("APT_COURSE_QUIET") == "1"
    return tqdm(iterable, desc=desc, total=total, disable=disable, mininterval=1.0)


def trl_loss_on_batch(trainer, n: int | None = None):
    """``(loss, batch)``: the loss a TRL trainer's ``compute_loss`` gives the first ``n`` rows of its train
    set, in order, and the collated batch it saw — for checking a from-scratch loss against the library's."""
    rows = [trainer.train_dataset[i] for i in range(n or len(trainer.train_dataset))]
    batch = trainer.data_collator(rows)
    device = next(trainer.model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if torch.is_tensor(v)}
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
    return loss, batch
