"""Chapter 13: the pipeline's stages trained by TRL's trainers (``apt-course train --trainer trl``).

Each ``train_*`` function here is the TRL twin of a chapter's from-scratch trainer, with the same arguments (the
chapter's config dataclass) and the same kind of history (``{"step": [...], "loss": [...], ...}``), so
:mod:`apt_course.pipeline` only picks one or the other:

* :func:`train_sft`: ``trl.SFTTrainer``, completion-only loss (:func:`~apt_course.sft.make_trl_sft_trainer`);
* :func:`train_dpo`: ``trl.DPOTrainer``; the NLL term ``sft_weight`` α is ``loss_type=["sigmoid", "sft"]``,
  ``loss_weights=[1, α]``;
* :func:`train_grpo`: ``trl.GRPOTrainer`` with the same reward functions (they read the dataset's columns); the
  KL reference is saved where TRL loads it from (:func:`save_reference`);
* :func:`train_storm`: :class:`StormSFTTrainer`, Gumbel noise on the logits, the rows fed in the order (and the
  curriculum stage) :func:`~apt_course.storm.train_storm` would draw them.

Why TRL: under ``accelerate launch`` (several GPUs, DeepSpeed ZeRO, FSDP) its trainers run data parallel, and the
from-scratch loops do not. Every process runs the same pipeline; a batch size here is the *global* batch, split
over the processes (rounded up). Each trainer trains a copy of the model (however accelerate wraps or shards it);
:func:`copy_trained_weights` writes the result back into the plain model on every process, which the pipeline then
measures and (main process only) saves.
"""

from __future__ import annotations

import copy
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch
from trl import SFTTrainer

from .dpo import DPOConfig
from .grpo import GRPOConfig
from .lm import completion_loss
from .sft import SFTConfig, TRLSFTConfig, make_trl_sft_trainer, to_trl_dataset
from .storm import (
    StormConfig,
    check_ratio,
    check_schedule,
    curriculum_stage,
    n_curriculum_stages,
    noise_ratio,
    noisy_completion_loss,
    storm_target,
)
from .utils import bf16_supported, process_state

# ---------------------------------------------------------------- shared plumbing

def per_device(global_batch: int) -> int:
    """Rows per process for a global batch of ``global_batch`` rows under data parallel (rounded up)."""
    return max(1, math.ceil(global_batch / process_state().num_processes))


def common_args(model, output_dir, kind: str) -> dict:
    """TRL config fields every stage shares: quiet, no checkpoints, CPU or bf16 GPU, one log line per step."""
    device = next(model.parameters()).device
    return {"output_dir": str(output_dir or Path(tempfile.gettempdir()) / f"apt_course_trl_{kind}"),
            "report_to": "none", "save_strategy": "no", "logging_steps": 1, "use_cpu": device.type == "cpu",
            "bf16": bf16_supported(device), "disable_tqdm": os.environ.get("APT_COURSE_QUIET") == "1",
            "dataloader_num_workers": 0}


def copy_trained_weights(trainer, model) -> None:
    """Write the weights ``trainer`` trained into ``model`` on every process. ``accelerator.get_state_dict`` gathers
    them; where only the main process receives them (FSDP, DeepSpeed ZeRO-3), they are broadcast from it."""
    from accelerate.utils import DistributedType

    acc = trainer.accelerator
    state = acc.get_state_dict(trainer.model_wrapped)
    zero3 = acc.distributed_type == DistributedType.DEEPSPEED and acc.deepspeed_config["zero_optimization"]["stage"] == 3
    sharded = zero3 or acc.distributed_type == DistributedType.FSDP
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in state:
                tensor.copy_(state[name])
            if sharded and acc.num_processes > 1:
                torch.distributed.broadcast(tensor, src=0)


def run_trainer(trainer, model, keys: dict[str, str]) -> dict:
    """Train, copy the weights back into ``model``, and return the log as a from-scratch history: ``step``
    (0-based) and, for each ``ours: theirs`` in ``keys``, TRL's logged ``theirs`` (NaN where a step lacks it)."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # a dict printed per step; the pipeline logs its own lines
    trainer.train()
    copy_trained_weights(trainer, model)
    logs = [r for r in trainer.state.log_history if "loss" in r]
    history = {"step": [r["step"] - 1 for r in logs]}
    for ours, theirs in keys.items():
        if any(r.get(theirs) is not None for r in logs):
            history[ours] = [float("nan") if r.get(theirs) is None else r[theirs] for r in logs]
    return history


# ---------------------------------------------------------------- SFT and DPO

def train_sft(model, tokenizer, examples: list[dict], config: SFTConfig = SFTConfig(), output_dir=None) -> dict:
    """:func:`apt_course.sft.train_sft` through ``trl.SFTTrainer``; returns ``{"step", "loss"}``."""
    args = common_args(model, output_dir, "sft")
    trl_config = TRLSFTConfig(steps=config.steps, batch_size=per_device(config.batch_size), lr=config.lr,
                              warmup=config.warmup, weight_decay=config.weight_decay, seed=config.seed, log_every=1,
                              extra={"bf16": args["bf16"]})
    trainer = make_trl_sft_trainer(copy.deepcopy(model), tokenizer, examples, trl_config, output_dir=args["output_dir"])
    return run_trainer(trainer, model, {"loss": "loss"})


def train_dpo(policy, ref, tokenizer, pairs: list[dict], config: DPOConfig = DPOConfig(), output_dir=None) -> dict:
    """:func:`apt_course.dpo.train_dpo` (sigmoid or IPO, plus the NLL term ``sft_weight``) through ``trl.DPOTrainer``;
    returns ``{"step", "loss", "margin"}``."""
    from .dpo import make_trl_dpo_trainer

    if config.loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"the TRL path runs DPO's sigmoid or ipo loss, got loss_type {config.loss_type!r}")
    losses, weights = [config.loss_type], [1.0]
    if config.sft_weight:
        losses, weights = losses + ["sft"], weights + [config.sft_weight]
    args = common_args(policy, output_dir, "dpo")
    trainer = make_trl_dpo_trainer(copy.deepcopy(policy), ref, tokenizer, pairs, config.beta, config.lr,
                                   per_device(config.batch_size), config.steps, seed=config.seed,
                                   logging_steps=args.pop("logging_steps"), output_dir=args.pop("output_dir"),
                                   explicit_prompts=True, **args, loss_type=losses,
                                   loss_weights=weights, warmup_steps=config.warmup, weight_decay=config.weight_decay,
                                   max_length=min(tokenizer.model_max_length, 1024))
    return run_trainer(trainer, policy, {"loss": "loss", "margin": "rewards/margins"})


# ---------------------------------------------------------------- GRPO (and the loyalty stage's GRPO)

def grpo_dataset(tokenizer, rows: list[dict]):
    """Prompt rows -> ``datasets.Dataset``: the chat-formatted prompt (system message included, so TRL applies no
    template) and every other column, which TRL hands the reward functions as keyword arguments."""
    from datasets import Dataset

    from .lm import format_prompts

    return Dataset.from_list([{**r, "prompt": text} for r, text in zip(rows, format_prompts(tokenizer, rows))])


def save_reference(ref, tokenizer, path: Path) -> str:
    """TRL's GRPOTrainer loads its KL reference from the policy's ``config._name_or_path``, not from a model object:
    save ``ref`` there (main process) for every process to load."""
    from .model import save_model

    state = process_state()
    if state.is_main_process:
        save_model(ref, tokenizer, path)
    state.wait_for_everyone()
    return str(path)


def train_grpo(model, ref_model, tokenizer, rows: list[dict], reward_fns, config: GRPOConfig = GRPOConfig(),
               output_dir=None) -> dict:
    """:func:`apt_course.grpo.train_grpo` through ``trl.GRPOTrainer`` (``rows``: dicts with a ``prompt`` and the
    columns the reward functions read; ``ref_model``: the KL reference, used when ``config.beta > 0``);
    returns ``{"step", "loss", "reward_mean", "kl"}`` (``kl`` only when TRL logs it: beta > 0)."""
    import trl

    args = common_args(model, output_dir, "grpo")
    prompts = per_device(config.prompts_per_step)
    scale = {True: "group", False: "none"}.get(config.scale_rewards, config.scale_rewards)
    trl_args = trl.GRPOConfig(**args, max_steps=config.steps, per_device_train_batch_size=prompts * config.group_size,
                              num_generations=config.group_size, max_completion_length=config.max_new_tokens,
                              learning_rate=config.lr, warmup_steps=config.warmup, lr_scheduler_type="cosine",
                              beta=config.beta, epsilon=config.epsilon, epsilon_high=config.epsilon_high,
                              loss_type=config.loss_type, scale_rewards=scale, num_iterations=config.num_iterations,
                              use_bias_correction_kl=config.kl_correction, temperature=config.temperature,
                              reward_weights=config.reward_weights, max_grad_norm=config.max_grad_norm,
                              seed=config.seed)
    work = copy.deepcopy(model)
    reference = Path(args["output_dir"]) / "reference"
    if config.beta > 0:
        work.config._name_or_path = save_reference(ref_model, tokenizer, reference)
    trainer = trl.GRPOTrainer(model=work, reward_funcs=list(reward_fns), args=trl_args,
                              train_dataset=grpo_dataset(tokenizer, rows), processing_class=tokenizer)
    history = run_trainer(trainer, model, {"loss": "loss", "reward_mean": "reward", "kl": "kl"})
    if config.beta > 0 and process_state().is_main_process:
        shutil.rmtree(reference, ignore_errors=True)
    return history


# ---------------------------------------------------------------- storm

class StormSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` with chapter 12's storm loss: the completion-only cross-entropy on logits plus Gumbel noise
    ``r(t) · g`` (:func:`~apt_course.storm.noisy_completion_loss`), ``r(t) =`` :func:`~apt_course.storm.noise_ratio`
    at progress ``t = global_step / (max_steps - 1)`` (as :func:`~apt_course.storm.train_storm` counts it). The noise
    generator is seeded with ``seed + process index``. Logs ``noise_ratio`` and ``clean_loss`` (no noise, mean over
    the processes) too."""

    def __init__(self, *args, r0: float = 0.0, schedule: str = "cosine", **kwargs):
        super().__init__(*args, **kwargs)
        self.r0, self.schedule = check_ratio(r0), check_schedule(schedule)
        self.noise_generator = None

    def current_ratio(self) -> float:
        t = min(1.0, self.state.global_step / max(1, self.args.max_steps - 1))
        return noise_ratio(t, self.r0, self.schedule)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
        if self.noise_generator is None:
            seed = self.args.seed + self.args.process_index
            self.noise_generator = torch.Generator(device=logits.device).manual_seed(seed)
        ratio = self.current_ratio()
        loss = noisy_completion_loss(logits, labels, ratio, self.noise_generator)
        if model.training:
            self._metrics["train"]["noise_ratio"].append(ratio)
            clean = completion_loss(logits.detach(), labels)  # every process's, as TRL logs the loss
            self._metrics["train"]["clean_loss"].append(self.accelerator.gather(clean).mean().item())
        return (loss, {"logits": logits}) if return_outputs else loss


def storm_rows(records: list[dict], config: StormConfig, global_batch: int) -> list[dict]:
    """The SFT rows :func:`~apt_course.storm.train_storm` would draw, step after step (its seeded sampling, its
    curriculum stage per step), ``global_batch`` rows a step: fed in this order, each optimiser step sees its stage."""
    rng = random.Random(config.seed)
    n_stages = n_curriculum_stages(records, config.n_stages)
    rows = []
    for step in range(config.steps):
        stage = curriculum_stage(step / max(1, config.steps - 1), n_stages) if config.cot == "internalise" else 0
        picked = rng.sample(records, min(global_batch, len(records)))
        for r in (picked * global_batch)[:global_batch]:  # a data-parallel global batch may round up past the rows
            rows.append({"prompt": r["problem"], "completion": storm_target(r, config.cot, stage, n_stages)})
    return rows


def make_storm_trainer(model, tokenizer, records: list[dict], config: StormConfig = StormConfig(),
                       output_dir=None) -> StormSFTTrainer:
    """A :class:`StormSFTTrainer` on ``model`` itself (not a copy) for ``config``'s budget, rows in order."""
    import trl

    if config.neftune_alpha:
        raise ValueError("the TRL storm path has no NEFTune (neftune_alpha); use the from-scratch train_storm")
    batch = per_device(min(config.batch_size, len(records)))
    rows = storm_rows(records, config, batch * process_state().num_processes)
    args = trl.SFTConfig(**common_args(model, output_dir, "storm"), max_steps=config.steps,
                         per_device_train_batch_size=batch, learning_rate=config.lr, warmup_steps=config.warmup,
                         weight_decay=config.weight_decay, lr_scheduler_type="cosine", seed=config.seed,
                         completion_only_loss=True, train_sampling_strategy="sequential",
                         max_length=min(tokenizer.model_max_length, config.max_length or 1024))
    return StormSFTTrainer(model=model, args=args, train_dataset=to_trl_dataset(rows, tokenizer=tokenizer),
                           processing_class=tokenizer, r0=config.r0, schedule=config.schedule)


def train_storm(model, tokenizer, records: list[dict], config: StormConfig = StormConfig(), output_dir=None) -> dict:
    """:func:`apt_course.storm.train_storm` through :class:`StormSFTTrainer`; returns ``{"step", "loss",
    "clean_loss", "ratio"}``."""
    trainer = make_storm_trainer(copy.deepcopy(model), tokenizer, records, config, output_dir)
    return run_trainer(trainer, model, {"loss": "loss", "clean_loss": "clean_loss", "ratio": "noise_ratio"})
