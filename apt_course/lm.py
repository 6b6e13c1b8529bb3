"""Language-model utilities every chapter shares: batching, generation, log-probabilities.

Conventions: a *prompt* is the text the chat template makes (see ``tokenizer.chat_prompt``), a
*completion* is what follows it. Batches are right-padded for training and scoring, left-padded for
generation. ``completion_mask`` is 1 exactly on the completion's tokens (the prompt is masked out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_LENGTH = 1024  # TRL's default for SFT, DPO and reward training; the tiny world never comes near it


def truncate_pair(p_ids: list[int], c_ids: list[int], max_length: int | None) -> tuple[list[int], list[int]]:
    """Fit prompt + completion into ``max_length`` tokens: drop prompt tokens from the **left** first (the end
    of a conversation, the question being answered, matters most), keeping at least half the budget for it,
    then cut the completion on the right."""
    if max_length is None or len(p_ids) + len(c_ids) <= max_length:
        return p_ids, c_ids
    keep_prompt = max(max_length - len(c_ids), max_length // 2)
    p_ids = p_ids[-keep_prompt:] if keep_prompt < len(p_ids) else p_ids
    return p_ids, c_ids[:max_length - len(p_ids)]


def build_batch(tokenizer, prompts: list[str], completions: list[str], add_eos: bool = True,
                device: torch.device | str = "cpu", max_length: int | None = MAX_LENGTH) -> dict[str, torch.Tensor]:
    """Tokenise prompt + completion pairs into a right-padded batch.

    Returns ``input_ids``, ``attention_mask``, ``completion_mask`` (1 on completion tokens, EOS included)
    and ``labels`` (= input ids, -100 on prompt and padding: the completion-only loss). Rows longer than
    ``max_length`` tokens are cut by :func:`truncate_pair` (None: never).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: they must pair up")
    if not prompts:
        raise ValueError("empty batch: pass at least one prompt/completion pair")
    rows, masks = [], []
    for p, c in zip(prompts, completions):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"]
        if add_eos:
            c_ids = c_ids + [tokenizer.eos_token_id]
        p_ids, c_ids = truncate_pair(p_ids, c_ids, max_length)
        rows.append(p_ids + c_ids)
        masks.append([0] * len(p_ids) + [1] * len(c_ids))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    completion_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
    labels = input_ids.masked_fill(completion_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask,
            "labels": labels}


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t = 1..T-1: shape (B, T-1). Position t of the result scores token t+1."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(model, batch: dict[str, torch.Tensor], reduction: str = "sum") -> torch.Tensor:
    """Per-sequence log-probability of the completion, prompt masked out.

    ``sum``: log π(y|x) = Σ_t m_t log π(y_t | x, y_<t);  ``mean``: the same divided by Σ_t m_t
    (the length-normalised form SimPO uses).
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token = token_logprobs(logits, batch["input_ids"])
    mask = batch["completion_mask"][:, 1:].to(per_token.dtype)
    total = (per_token * mask).sum(-1)
    return total if reduction == "sum" else total / mask.sum(-1).clamp(min=1)


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The SFT loss: mean cross-entropy over completion tokens only (labels = -100 elsewhere).

    L = -(1/N) Σ_{t: label_t ≠ -100} log p(label_t | x_<t), N the number of completion tokens in the batch.
    """
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 16, do_sample: bool = False,
             temperature: float = 1.0, batch_size: int = 256, num_return_sequences: int = 1,
             strip: bool = True) -> list[str]:
    """Complete each prompt; returns the completions' text (prompt removed, cut at EOS).

    Greedy by default; ``do_sample=True`` samples at ``temperature`` from the full distribution. With
    ``num_return_sequences=k`` the list holds k completions per prompt, prompt by prompt.
    """
    if not prompts:
        raise ValueError("no prompts to complete")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            kwargs = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if do_sample else \
                dict(do_sample=False, temperature=None, top_k=None, top_p=None)
            seqs = model.generate(**enc, max_new_tokens=max_new_tokens, num_return_sequences=num_return_sequences,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  **kwargs)
            for row in seqs[:, enc["input_ids"].shape[1]:]:
                text = tokenizer.decode(row, skip_special_tokens=False)
                text = text.split(tokenizer.eos_token)[0].replace(tokenizer.pad_token, "")
                out.append(text.strip() if strip else text)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out
