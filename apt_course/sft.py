"""Chapter 04 core: supervised fine-tuning with the completion-only loss, from scratch and with TRL/PEFT.

Each example is an instruction (``prompt``, the user's text) and a ``completion``; the chat template
turns it into ``<|user|>prompt<|assistant|>completion<eos>`` and only the completion's tokens are
learned (see :func:`apt_course.lm.completion_loss`).

* :func:`train_sft` / :class:`SFTConfig`: the from-scratch loop;
* :func:`run_trl_sft` / :class:`TRLSFTConfig`: the same data through ``trl.SFTTrainer`` (prompt–completion
  or conversational format), :func:`apt_course.training.trl_loss_on_batch` for the parity check;
* :func:`add_lora`, :func:`merge_and_save`: LoRA adapters with PEFT;
* :func:`coig_to_sft`, :func:`load_apt_instructions`: real instruction data (COIG-CQIA, APT JSON) to records.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .lm import MAX_LENGTH, build_batch, completion_loss
from .tokenizer import chat_prompt, format_prompt, messages_for
from .training import make_optimizer, optimizer_step, progress


@dataclass
class SFTConfig:
    """Settings of :func:`train_sft`.

    steps: optimiser steps; batch_size: examples per step; lr: peak learning rate (warm-up, cosine);
    seed: the order of the examples.
    """

    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 10


def to_sft_pairs(examples: list[dict], tokenizer=None) -> tuple[list[str], list[str]]:
    """Instruction records (``prompt`` + ``answer`` or ``completion``, optional ``system``) to chat-formatted
    prompts and completions.

    The prompt goes through ``tokenizer``'s own chat template (:func:`~apt_course.tokenizer.format_prompt`: the
    course's template for the tiny model, ChatML for SmolLM2...), so a model is trained on the template it is
    evaluated with; ``tokenizer=None`` uses the course's template."""
    if not examples:
        raise ValueError("no SFT examples: the dataset has zero rows")
    prompts, completions = [], []
    for i, ex in enumerate(examples):
        completion = ex.get("completion", ex.get("answer"))
        if "prompt" not in ex or completion is None:
            raise KeyError(f"row {i} needs 'prompt' and 'completion' (or 'answer'); it has {sorted(ex)}")
        if not str(ex["prompt"]).strip() or not str(completion).strip():
            raise ValueError(f"row {i} has an empty prompt or completion: fill it in or drop the row")
        prompts.append(format_prompt(tokenizer, ex["prompt"], ex.get("system")) if tokenizer is not None
                       else chat_prompt(ex["prompt"], ex.get("system")))
        completions.append(str(completion))
    return prompts, completions


def train_sft(model, tokenizer, examples: list[dict], config: SFTConfig = SFTConfig()) -> dict:
    """Fine-tune on instruction examples with the completion-only loss.

    Returns the history ``{"step": [...], "loss": [...]}``.
    """
    prompts, completions = to_sft_pairs(examples, tokenizer)
    device = next(model.parameters()).device
    rng = random.Random(config.seed)
    opt, sched = make_optimizer(model, config.lr, config.steps, config.warmup, config.weight_decay)
    history = {"step": [], "loss": []}
    model.train()
    for step in progress(range(config.steps), "SFT"):
        idx = rng.sample(range(len(prompts)), min(config.batch_size, len(prompts)))
        batch = build_batch(tokenizer, [prompts[i] for i in idx], [completions[i] for i in idx], device=device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = completion_loss(logits, batch["labels"])
        optimizer_step(loss, model, opt, sched)
        if step % config.log_every == 0 or step == config.steps - 1:
            history["step"].append(step)
            history["loss"].append(loss.item())
    return history


# ---------------------------------------------------------------- the same data for TRL

def to_trl_dataset(examples: list[dict], conversational: bool = False, tokenizer=None):
    """Instruction records as a ``datasets.Dataset`` in one of TRL's prompt–completion formats.

    ``conversational=False``: ``{"prompt": "<|user|>add 3 5<|assistant|>", "completion": "8"}`` (the chat
    template already applied; TRL appends EOS to the completion).
    ``conversational=True``:  ``{"prompt": [{"role": "user", ...}], "completion": [{"role": "assistant", ...}]}``
    (TRL applies the tokenizer's chat template itself). Both give the same token ids as :func:`to_sft_pairs`
    + :func:`apt_course.lm.build_batch` with the course tokenizer (a test checks it).
    """
    from datasets import Dataset

    prompts, completions = to_sft_pairs(examples, tokenizer)
    if not conversational:
        return Dataset.from_dict({"prompt": prompts, "completion": completions})
    rows = {"prompt": [], "completion": []}
    for ex, completion in zip(examples, completions):
        rows["prompt"].append(messages_for(str(ex["prompt"]), ex.get("system")))
        rows["completion"].append([{"role": "assistant", "content": completion}])
    return Dataset.from_dict(rows)


@dataclass
class TRLSFTConfig:
    """Settings of :func:`run_trl_sft` (mapped onto ``trl.SFTConfig``).

    steps: optimiser steps (``max_steps``); batch_size: ``per_device_train_batch_size``; lr: peak learning
    rate (warm-up ``warmup``, cosine decay); conversational: feed TRL the ``messages`` format instead of
    pre-templated strings; log_every: ``logging_steps``; extra: any other ``trl.SFTConfig`` field.
    """

    steps: int = 100
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 10
    weight_decay: float = 0.0
    seed: int = 0
    conversational: bool = False
    log_every: int = 10
    extra: dict = field(default_factory=dict)


def make_trl_sft_trainer(model, tokenizer, examples: list[dict], config: TRLSFTConfig = TRLSFTConfig(),
                         peft_config=None, output_dir: str | None = None):
    """A ``trl.SFTTrainer`` on the same data as :func:`train_sft`, completion-only loss, quiet, CPU-friendly."""
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    use_cpu = next(model.parameters()).device.type == "cpu"
    args = TrlSFTConfig(
        output_dir=output_dir or os.path.join(tempfile.gettempdir(), "apt_course_trl_sft"), max_steps=config.steps,
        per_device_train_batch_size=config.batch_size, learning_rate=config.lr, warmup_steps=config.warmup,
        lr_scheduler_type="cosine", weight_decay=config.weight_decay, seed=config.seed,
        logging_steps=config.log_every, completion_only_loss=True, save_strategy="no", report_to="none",
        use_cpu=use_cpu, disable_tqdm=os.environ.get("APT_COURSE_QUIET") == "1", dataloader_num_workers=0,
        max_length=min(tokenizer.model_max_length, 1024), **config.extra,
    )
    dataset = to_trl_dataset(examples, conversational=config.conversational, tokenizer=tokenizer)
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config)


@torch.no_grad()
def heldout_loss(model, tokenizer, examples: list[dict], batch_size: int = 64,
                 max_length: int | None = MAX_LENGTH) -> float:
    """Mean completion-only loss on held-out examples (token-weighted), the metric for data without exact answers.
    Rows longer than ``max_length`` tokens are cut as :func:`~apt_course.lm.build_batch` cuts them."""
    prompts, completions = to_sft_pairs(examples, tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(prompts), batch_size):
        batch = build_batch(tokenizer, prompts[i:i + batch_size], completions[i:i + batch_size], device=device,
                            max_length=max_length)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += completion_loss(logits, batch["labels"]).item() * n
        count += n
    model.train(was_training)
    return total / count


def run_trl_sft(model, tokenizer, examples: list[dict], config: TRLSFTConfig = TRLSFTConfig(), peft_config=None):
    """Fine-tune with TRL's ``SFTTrainer``; returns ``(trained model, history {"step", "loss"})``.

    With ``peft_config`` (a ``peft.LoraConfig``) the returned model is the ``PeftModel`` TRL trained.
    """
    trainer = make_trl_sft_trainer(model, tokenizer, examples, config, peft_config)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    history = {"step": [r["step"] for r in logs], "loss": [r["loss"] for r in logs]}
    return trainer.model, history


# ---------------------------------------------------------------- LoRA with PEFT

def add_lora(model, r: int = 8, alpha: int = 16, dropout: float = 0.0,
             target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"), seed: int = 0):
    """Wrap ``model`` with LoRA adapters: W x + (alpha / r) · B A x, A ∈ R^{r×in}, B ∈ R^{out×r}, B = 0 at start.

    Only A and B train: each adapted ``Linear(in, out)`` adds r·(in + out) parameters.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class AdapterOff:
    """The frozen reference of a LoRA policy without a second copy of the model: the same ``PeftModel`` called
    with its adapters switched off (``disable_adapter()``), i.e. the starting model W x exactly. Pass it where a
    trainer wants ``ref_model``; ``eval()`` and ``requires_grad_()`` leave the shared weights alone (the policy
    still trains through them)."""

    def __init__(self, peft_model):
        if not hasattr(peft_model, "disable_adapter"):
            raise TypeError(f"AdapterOff needs a PEFT model (from add_lora), got {type(peft_model).__name__}: "
                            "without adapters there is nothing to switch off; pass a frozen copy as the reference")
        self.model = peft_model

    def __call__(self, *args, **kwargs):
        with self.model.disable_adapter():
            return self.model(*args, **kwargs)

    def eval(self):
        return self

    def requires_grad_(self, requires_grad: bool = True):
        return self

    def parameters(self):
        return self.model.parameters()


def merge_and_save(peft_model, tokenizer, path) -> Path:
    """Fold the adapters into the weights (W ← W + (alpha/r) B A) and save a plain model ``from_pretrained``
    loads with no PEFT at all."""
    from .model import save_model

    merged = peft_model.merge_and_unload()
    return save_model(merged, tokenizer, path)
