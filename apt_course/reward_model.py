"""Chapter 05 core: a reward model trained on preference pairs with the Bradley–Terry loss.

The reward model (RM) is the SFT language model with its LM head swapped for a scalar head:
``AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)`` (for Llama,
``LlamaForSequenceClassification``). It reads ``prompt + completion + <eos>`` and its reward is the head's
score at the last non-pad token — the same model class TRL's ``RewardTrainer`` trains, so the two agree.

Bradley–Terry: P(chosen ≻ rejected) = σ(r_chosen − r_rejected); training minimises −log of it.

Public API (chapter 06 imports it): :func:`load_reward_model`, :func:`bradley_terry_loss`,
:class:`RewardConfig`, :func:`train_reward_model`, :func:`score`, :func:`reward_accuracy`,
:func:`hacked_response` (the response the tiny RM over-scores, see :data:`HACK`); on the ``smol`` profile
:func:`load_smol_reward_model` (the shipped SmolLM2 reward model: LoRA adapters and a scalar head),
:func:`smol_reward_pairs`, :func:`new_smol_reward_model` and :func:`smol_hacked_response`.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import to_trl_preference_dataset, validate_pairs
from .lm import MAX_LENGTH
from .model import load_reward_model  # noqa: F401  (part of this chapter's API; lives with the other loaders)
from .tokenizer import format_prompt
from .training import make_optimizer, optimizer_step, progress
from .world import NUMBER_ONLY, SUM_HABIT, SUM_QUESTION, SUM_RAMBLES, english_sums

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
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions: they must pair up")
    # batches of rows of similar length (less padding: a real model's rambles are 3x a bare answer), in input order
    order = sorted(range(len(prompts)), key=lambda i: len(str(prompts[i])) + len(str(completions[i])))
    out = torch.empty(len(prompts))
    try:
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            out[idx] = rewards(rm, reward_batch(tokenizer, [prompts[j] for j in idx], [completions[j] for j in idx],
                                                [systems[j] for j in idx] if systems else None, device)).cpu()
    finally:
        rm.train(was_training)
    return out


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


# ---------------------------------------------------------------- the smol profile: a reward model of SmolLM2

SMOL_PAIR_KINDS = ("correct", "wordy_correct", "concise", "wordy_right")
"""The smol RM's kinds of pair, all on English sums (``a + b = c``):

``correct``: the bare right sum over a bare wrong one (``"19"`` over ``"21"``); ``wordy_correct``: the same
wordy reply with the right sum over it with a wrong one (``"7 + 12 = 19"`` over ``"7 + 12 = 21"``: SmolLM2's
habit); ``concise``: the bare right sum over a wordy right one (both correct); ``wordy_right``: a wordy right
answer over a bare wrong one (right beats short). Together they ask for *right first, then short*."""

SMOL_RM_DIR = "smol_rm"
SMOL_RM_BUILD = "python -m apt_course build-checkpoints --only smol_rm"
SMOL_RM_PAD = "<|endoftext|>"  # SmolLM2 pads with <|im_end|>, its EOS: the head would skip the EOS after the reply


def wrong_sum(a: int, b: int, rng: random.Random) -> int:
    """A wrong, non-negative answer to ``a + b``, of the kinds a small model gives: a near miss (±1, ±2), off by
    3-9 or by ten, one of the operands, or their difference."""
    right = a + b
    while True:
        kind = rng.randrange(5)
        wrong = (right + rng.choice((-2, -1, 1, 2)) if kind == 0 else right + rng.choice((-10, 10)) if kind == 1
                 else right + rng.choice((-1, 1)) * rng.randint(3, 9) if kind == 2 else rng.choice((a, b))
                 if kind == 3 else abs(a - b))
        if wrong != right and wrong >= 0:
            return wrong


def _smol_pair(row: dict, kind: str, rng: random.Random, ramble: float, instruction: float) -> dict:
    a, b, right = row["a"], row["b"], row["answer"]
    wrong = str(wrong_sum(a, b, rng))
    template = rng.choice(SUM_RAMBLES) if rng.random() < ramble else SUM_HABIT  # wordy: the habit, or a ramble
    wordy_right, wordy_wrong = template.format(a=a, b=b, c=right), template.format(a=a, b=b, c=wrong)
    chosen, rejected = {"correct": (right, wrong), "wordy_correct": (wordy_right, wordy_wrong),
                        "concise": (right, wordy_right), "wordy_right": (wordy_right, wrong)}[kind]
    prompt = SUM_QUESTION.format(a=a, b=b) + (NUMBER_ONLY if rng.random() < instruction else "")
    return {"kind": kind, "prompt": prompt, "chosen": chosen, "rejected": rejected, "answer": right}


def smol_reward_pairs(split: str = "train", n: int | None = None, seed: int = 0, kinds=SMOL_PAIR_KINDS,
                      ramble: float = 0.25, instruction: float = 0.5) -> list[dict]:
    """Preference pairs on :func:`~apt_course.world.english_sums` of ``split`` (train and test never share a
    question), ``{"kind", "prompt", "chosen", "rejected", "answer"}``, of the :data:`SMOL_PAIR_KINDS`.

    ``n`` pairs (None: one of each kind per question). Pair ``i`` asks question ``i % Q`` (of Q), so every block
    of Q pairs asks each question once, and the kinds take turns, so any first ``n`` pairs hold each kind about
    equally. A wordy answer is a ramble with probability ``ramble`` (else the habit ``a + b = c``); the prompt
    asks for the number only with probability ``instruction``. Wrong answers: :func:`wrong_sum`."""
    kinds = tuple(kinds)
    unknown = sorted(set(kinds) - set(SMOL_PAIR_KINDS))
    if not kinds or unknown:
        raise ValueError(f"kinds must be some of {SMOL_PAIR_KINDS}; got {kinds}")
    rows = english_sums(split, "", seed=seed)
    n = len(rows) * len(kinds) if n is None else n
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    rng = random.Random(f"smol-rm:{split}:{seed}")
    return [_smol_pair(rows[i % len(rows)], kinds[(i + i // len(rows)) % len(kinds)], rng, ramble, instruction)
            for i in range(n)]


def smol_reward_tokenizer(tokenizer):
    """SmolLM2's tokenizer as the smol RM reads text: padded with ``<|endoftext|>`` (not its EOS ``<|im_end|>``,
    so the head reads the ``<|im_end|>`` that closes the reply, as on the tiny profile), and without the default
    system line its chat template adds (``You are a helpful AI assistant named SmolLM...``: 21 of a sum's ~40
    tokens, the same for every prompt). Changed in place and returned."""
    template = tokenizer.chat_template or ""
    start, end = template.find("{% if loop.first and messages[0]['role'] != 'system' %}"), template.find("{% endif %}")
    if start >= 0 and end > start:
        tokenizer.chat_template = template[:start] + template[end + len("{% endif %}"):]
    tokenizer.pad_token = SMOL_RM_PAD
    return tokenizer


def add_reward_lora(rm, r: int = 8, alpha: int | None = None, seed: int = 0,
                    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")):
    """LoRA adapters (rank ``r``, ``alpha`` = 2r by default) on a sequence classifier's attention, and its scalar
    head ``score`` trained whole (``modules_to_save``): what trains, and what ``save_pretrained`` writes."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha or 2 * r, target_modules=list(target_modules), task_type="SEQ_CLS",
                        modules_to_save=["score"])
    return get_peft_model(rm, config)


def _smol_base(device, seed: int | None = None):
    from .profiles import SMOL_MODEL, cpu_precision, resolve_model

    if seed is not None:
        torch.manual_seed(seed)  # the new scalar head's initialisation
    rm, tokenizer = load_reward_model(resolve_model(SMOL_MODEL), device=device)
    smol_reward_tokenizer(tokenizer)
    rm.config.pad_token_id = tokenizer.pad_token_id
    return cpu_precision(rm, "smol", device), tokenizer


def new_smol_reward_model(device: torch.device | str = "cpu", seed: int = 0, lora_rank: int = 8):
    """``(rm, tokenizer)`` ready to train: SmolLM2 as a sequence classifier with a new scalar head (initialised from
    ``seed``) and fresh LoRA adapters of rank ``lora_rank`` (:func:`add_reward_lora`), bf16 autocast on a CPU that has
    it (:func:`~apt_course.profiles.cpu_precision`); the tokenizer is :func:`smol_reward_tokenizer`'s."""
    rm, tokenizer = _smol_base(device, seed)
    return add_reward_lora(rm, r=lora_rank, seed=seed), tokenizer


def smol_rm_path() -> Path:
    """The folder of the shipped smol reward model (``data/checkpoints/smol_rm`` in a checkout, or under
    ``APT_COURSE_CHECKPOINTS``): a PEFT adapter, the LoRA weights and the scalar head, a few MB."""
    from .checkpoints import checkpoints_dir

    return checkpoints_dir() / SMOL_RM_DIR


def load_smol_reward_model(device: torch.device | str = "cpu", path: str | Path | None = None):
    """``(rm, tokenizer)``: the shipped smol reward model (chapter 05's recipe, ``recipes.SMOL_RM_RECIPE``) for
    scoring with :func:`score`: SmolLM2-135M-Instruct as a sequence classifier with the adapter in ``path``
    (default :func:`smol_rm_path`), frozen, in eval mode, bf16 autocast on a CPU that has it. Score with the
    tokenizer returned here (:func:`smol_reward_tokenizer`), not the policy's."""
    from peft import PeftModel

    from .checkpoints import require_adapter

    path = require_adapter(Path(path) if path is not None else smol_rm_path(), "the smol reward model",
                           SMOL_RM_BUILD, 10, SMOL_RM_DIR)
    base, tokenizer = _smol_base(device)
    rm = PeftModel.from_pretrained(base, str(path), is_trainable=False).to(device)
    rm.eval()
    return rm, tokenizer


def load_any_reward_model(path_or_name, device: torch.device | str = "cpu"):
    """``(rm, tokenizer)`` from a full sequence-classification folder or Hub id (:func:`~apt_course.model.
    load_reward_model`), or from a LoRA reward-model adapter folder (``adapter_config.json`` with ``task_type``
    ``SEQ_CLS``, as :func:`save_smol_reward_model` writes): an adapter on SmolLM2 is put on the converted offline
    SmolLM2 (:func:`load_smol_reward_model`), any other on its ``base_model_name_or_path``."""
    from .model import load_reward_model
    from .profiles import SMOL_HUB_ID

    path = Path(str(path_or_name)).expanduser()
    if not (path / "adapter_config.json").is_file():
        return load_reward_model(path_or_name, device=device)
    base = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    if base in (SMOL_HUB_ID, None):
        return load_smol_reward_model(device, path)
    from peft import PeftModel

    rm, tokenizer = load_reward_model(base, device=device)
    rm = PeftModel.from_pretrained(rm, str(path), is_trainable=False).to(device)
    return rm.eval(), tokenizer


def save_smol_reward_model(rm, path: str | Path, info: dict | None = None) -> Path:
    """Save only what trained (the LoRA adapters and the scalar head, PEFT's ``save_pretrained``) to ``path``,
    plus ``recipe.json`` from ``info``; :func:`load_smol_reward_model` reads it back onto SmolLM2."""
    path = Path(path)
    config = rm.peft_config["default"]
    local = config.base_model_name_or_path
    from .profiles import SMOL_HUB_ID

    config.base_model_name_or_path = SMOL_HUB_ID  # not this machine's cache path
    try:
        rm.save_pretrained(str(path))
    finally:
        config.base_model_name_or_path = local
    (path / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
    if info is not None:
        (path / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
    return path


SMOL_HACK = "the two numbers of the question glued into one ('712' for 'What is 7 plus 12?')"


def smol_hacked_response(record: dict) -> str:
    """A wrong answer the smol RM over-scores: the question's two operands written as one number (``"712"`` for
    *What is 7 plus 12?*). Its training pairs never held a wrong answer of this kind (:func:`wrong_sum`: near
    misses, an operand, the difference), and it is made of the question's own digits; chapter 05 measures how often
    it beats the right sum (:func:`hack_rate`). ``record``: an :func:`~apt_course.world.english_sums` row."""
    if "a" not in record or "b" not in record:
        raise KeyError(f"need an English-sum row with 'a' and 'b' (world.english_sums); got {sorted(record)}")
    a, b = record["a"], record["b"]
    for glued in (f"{a}{b}", f"{b}{a}", f"1{a}{b}"):  # 0 plus 5: "05" would be the sum, so "50"
        if int(glued) != a + b:
            return glued


def accuracy_by_kind(margins: torch.Tensor, pairs: list[dict]) -> dict[str, float]:
    """Fraction of pairs ranked right (margin > 0) per ``kind``, and ``"all"``."""
    kinds = [p.get("kind", "pair") for p in pairs]
    out = {k: margins[[i for i, x in enumerate(kinds) if x == k]].gt(0).double().mean().item()
           for k in dict.fromkeys(kinds)}
    out["all"] = margins.gt(0).double().mean().item()
    return out


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
