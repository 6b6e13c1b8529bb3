"""Language-model utilities every chapter shares: batching, generation, rollouts, log-probabilities.

Conventions: a *prompt* is the text the chat template makes (see ``tokenizer.format_prompt``), a
*completion* is what follows it. Batches are right-padded for training and scoring, left-padded for
generation. ``completion_mask`` is 1 exactly on the completion's tokens (the prompt is masked out).

* batches: :func:`build_batch` (prompt + completion), :func:`build_pair_batch` (chosen rows, then rejected rows);
* log-probabilities: :func:`completion_logprobs` - the one helper every chapter uses - and
  :func:`completion_token_logprobs` for callers that already ran the forward pass;
* the SFT loss :func:`completion_loss`; greedy or sampled :func:`generate`;
* rollouts for the online trainers (chapters 06, 09-11): :func:`prompt_rows`, :func:`format_prompts`,
  :func:`sample_groups`, and :func:`nanstd` for baselines that skip unscorable (NaN) rewards.

Shared layer: imports no chapter module (``tests/test_structure.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .tokenizer import format_prompt

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
    # one tokenizer call per side (a fast tokenizer encodes the list in one batch), not one per row
    p_all = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    c_all = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    for p_ids, c_ids in zip(p_all, c_all):
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


def completion_token_logprobs(logits: torch.Tensor, batch: dict[str, torch.Tensor],
                              temperature: float = 1.0, everywhere: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp, mask)``: log π(y_t | x, y_<t) of every completion token from a forward pass's ``logits``, and
    the mask that is 1 exactly on completion tokens. Logits are divided by ``temperature`` (as at sampling).
    Positions outside the mask are 0, unless ``everywhere`` (ORPO's NLL over the prompt too) scores them all.

    Two batch layouts, one answer:

    * a training batch from :func:`build_batch` (``input_ids`` = prompt + completion, right-padded):
      ``logp`` is (B, T-1), position t scoring token t+1, and ``mask`` = ``completion_mask[:, 1:]``;
    * a rollout from :func:`sample_groups` (``prompt_ids`` left-padded, then ``completion_ids``; the logits are
      those of the concatenation): ``logp`` is (B, T_completion), aligned with ``completion_ids``, and
      ``mask`` = ``completion_mask``.
    """
    if "prompt_ids" in batch:
        P = batch["prompt_ids"].size(1)
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
        mask = batch["completion_mask"]
        return _masked_token_logprobs(logits[:, P - 1:] / temperature, ids[:, P - 1:], mask, everywhere), mask
    mask = batch["completion_mask"][:, 1:]
    return _masked_token_logprobs(logits / temperature, batch["input_ids"], mask, everywhere), mask


def _masked_token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                           everywhere: bool = False) -> torch.Tensor:
    """:func:`token_logprobs` computed only where ``mask`` (B, T-1) is 1, zero elsewhere: the softmax over the
    vocabulary is the expensive part, and a real model's prompts are long (log p = z_y - logsumexp(z))."""
    if everywhere:
        return token_logprobs(logits, input_ids)
    keep = mask.bool()
    out = torch.zeros(keep.shape, dtype=torch.float32, device=logits.device)
    chosen = logits[:, :-1][keep].float()  # (N, V): the completion positions only
    out[keep] = chosen.gather(-1, input_ids[:, 1:][keep].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(chosen, -1)
    return out


def batch_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of either batch layout (a rollout's prompt and completion joined)."""
    if "prompt_ids" in batch:
        return {"input_ids": torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
                "attention_mask": torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def completion_logprobs(model, batch: dict[str, torch.Tensor], reduction: str = "sum",
                        temperature: float = 1.0) -> torch.Tensor:
    """The completion's log-probability under ``model``, prompt masked out — the one helper every chapter
    uses (DPO's, ORPO's and RLOO's sequence log-probs; PPO's and GRPO's per-token ones).

    ``sum``:  log π(y|x) = Σ_t m_t log π(y_t | x, y_<t), shape (B,);
    ``mean``: the same divided by Σ_t m_t (the length-normalised form of SimPO and ORPO), shape (B,);
    ``none``: the per-token terms log π(y_t | x, y_<t), shape (B, T'), masked by
    :func:`completion_token_logprobs`' mask (zero elsewhere is *not* guaranteed: multiply by the mask).
    """
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    logits = model(**batch_inputs(batch)).logits
    per_token, mask = completion_token_logprobs(logits, batch, temperature)
    if reduction == "none":
        return per_token
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum(-1)
    return total if reduction == "sum" else total / mask.sum(-1).clamp(min=1)


def completion_lengths(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Σ_t m_t: the number of completion tokens of every row, in either batch layout (float)."""
    mask = batch["completion_mask"] if "prompt_ids" in batch else batch["completion_mask"][:, 1:]
    return mask.float().sum(-1)


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


# ---------------------------------------------------------------- prompts, pairs, rollouts (chapters 06-13)

def prompt_rows(prompts) -> list[dict]:
    """Normalise prompts (strings, or dicts with ``prompt`` and extra columns) to a list of dicts."""
    if prompts is None or len(prompts) == 0:
        raise ValueError("the prompt set is empty: an online trainer needs prompts to sample from (e.g. "
                         "world.verifiable_problems(500, 'train'))")
    rows = []
    for i, p in enumerate(prompts):
        row = {"prompt": p} if isinstance(p, str) else dict(p)
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise ValueError(f"prompt row {i} needs a non-empty string 'prompt'; it is {p!r}")
        rows.append(row)
    keys = set(rows[0])
    for i, row in enumerate(rows):
        if set(row) != keys:
            raise ValueError(f"prompt row {i} has columns {sorted(row)} but row 0 has {sorted(keys)}: "
                             "every row needs the same columns (they are passed to the reward functions)")
    return rows


def format_prompts(tokenizer, rows: list[dict]) -> list[str]:
    """Each row's chat prompt text (its ``system`` message too), ready for the assistant's reply."""
    return [format_prompt(tokenizer, row["prompt"], row.get("system")) for row in rows]


def build_pair_batch(tokenizer, pairs: list[dict], device="cpu") -> dict[str, torch.Tensor]:
    """2B right-padded rows for preference pairs: the B chosen completions, then the B rejected ones (the
    layout TRL's ``DataCollatorForPreference`` builds), each prompt through the tokenizer's chat template."""
    prompts = [format_prompt(tokenizer, p["prompt"], p.get("system")) for p in pairs]
    return build_batch(tokenizer, prompts + prompts, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs],
                       device=device)


@torch.no_grad()
def sample_groups(model, tokenizer, prompt_texts: list[str], group_size: int, max_new_tokens: int,
                  temperature: float = 1.0) -> dict:
    """G sampled completions per prompt (prompt by prompt): token ids, masks and text — a rollout.

    ``completion_mask`` is 1 up to and including the first EOS (everything, when there is none);
    ``truncated`` marks completions that hit ``max_new_tokens`` without an EOS.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompt_texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side
    prompt_ids = enc["input_ids"].repeat_interleave(group_size, 0)
    prompt_mask = enc["attention_mask"].repeat_interleave(group_size, 0)
    seqs = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True, temperature=temperature,
                          top_k=0, top_p=1.0, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    completion_ids = seqs[:, prompt_ids.shape[1]:]
    is_eos = completion_ids == tokenizer.eos_token_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.full_like(is_eos[:, 0], is_eos.size(1),
                                                                               dtype=torch.long))
    positions = torch.arange(completion_ids.size(1), device=device).expand_as(completion_ids)
    completion_mask = (positions <= first.unsqueeze(1)).long()
    texts = [tokenizer.decode(row[:n], skip_special_tokens=False).strip()
             for row, n in zip(completion_ids.tolist(), first.tolist())]
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "texts": texts, "truncated": ~is_eos.any(1)}


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction (n - 1), as ``trl.trainer.utils.nanstd``
    (used by the group and leave-one-out baselines of GRPO and RLOO, where an unscorable reply is NaN)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    n = (~torch.isnan(x)).sum(dim=dim, keepdim=True) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.nansum((x - mean) ** 2, dim=dim, keepdim=True) / (n - 1).clamp(min=1)
    return var.sqrt()
