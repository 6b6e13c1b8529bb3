"""Chapter 00: pretraining the tiny model on tiny-world text (next-token prediction)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .training import make_optimizer, optimizer_step, progress


@dataclass
class PretrainConfig:
    """Settings of :func:`pretrain`.

    steps: optimiser steps; batch_size: sequences per step; seq_len: tokens per packed sequence;
    lr: peak learning rate (warm-up then cosine); seed: order of the batches.
    """

    steps: int = 600
    batch_size: int = 64
    seq_len: int = 64
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    seed: int = 0
    log_every: int = 10


def pack_texts(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate the texts (each followed by EOS) into one token stream cut into ``seq_len`` rows."""
    if not texts:
        raise ValueError("no pretraining texts: pass a non-empty list of strings")
    stream: list[int] = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    rows = len(stream) // seq_len
    if rows < 1:
        raise ValueError(f"the texts hold {len(stream)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(stream[: rows * seq_len]).view(rows, seq_len)


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: L = -(1/N) Σ_t log p(x_{t+1} | x_≤t)."""
    logits = model(input_ids=tokens).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate_lm_loss(model, tokens: torch.Tensor, batch_size: int = 128) -> float:
    """Mean next-token loss over packed rows (its exp is the perplexity)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    losses = [lm_loss(model, tokens[i:i + batch_size].to(device)).item() * len(tokens[i:i + batch_size])
              for i in range(0, len(tokens), batch_size)]
    model.train(was)
    return sum(losses) / len(tokens)


def pretrain(model, tokenizer, texts: list[str], config: PretrainConfig = PretrainConfig()) -> dict:
    """Train ``model`` on ``texts`` by next-token prediction; returns ``{"step": [...], "loss": [...]}``."""
    device = next(model.parameters()).device
    data = pack_texts(tokenizer, texts, config.seq_len)
    gen = torch.Generator().manual_seed(config.seed)
    opt, sched = make_optimizer(model, config.lr, config.steps, config.warmup, config.weight_decay)
    history = {"step": [], "loss": []}
    model.train()
    for step in progress(range(config.steps), "pretraining"):
        idx = torch.randint(len(data), (config.batch_size,), generator=gen)
        loss = lm_loss(model, data[idx].to(device))
        optimizer_step(loss, model, opt, sched)
        if step % config.log_every == 0 or step == config.steps - 1:
            history["step"].append(step)
            history["loss"].append(loss.item())
    return history
