"""Chapter 12 core: storm training — Gumbel noise on the logits under a schedule, NEFTune, and stepwise
internalisation of the chain of thought — written out and measured against baselines.

The APT system's stage 4 ("trained in the storm, stronger in fair weather") adds Gumbel noise to the logits
during training, ``logits + r(t) · g`` with ``g = -log(-log u)``, ``u ~ U(0, 1)``, its ratio ``r(t)`` following a
schedule over training progress ``t ∈ [0, 1]``, and trains on reasoning the model should later do without writing
it down. Here:

* **noise**: :func:`gumbel_noise`, :func:`noise_ratio` (cosine / linear / constant), :func:`add_gumbel_noise`,
  :func:`noisy_completion_loss` (the completion-only cross-entropy of :func:`apt_course.lm.completion_loss` on
  noisy logits);
* **NEFTune** (Jain et al. 2023; ``neftune_noise_alpha`` in transformers/TRL): uniform noise on the input
  embeddings, :func:`neftune_noise`, :func:`activate_neftune`;
* **stepwise internalisation** of the chain of thought (Deng et al. 2024): :func:`curriculum_stage`,
  :func:`removed_steps`, :func:`staged_completion` drop reasoning steps from the front, stage by stage,
  until only the answer is trained;
* the trainer :func:`train_storm` (``model, tokenizer, records, StormConfig -> history``), the measurement
  :func:`evaluate_storm` (answer accuracy clean and perturbed, tokens per answer) and :func:`compare_conditions`;
* data: the unified storm record ``{"problem", "cot_explicit", "answer", "source"}`` (plus ``steps``), built from
  the tiny world (:func:`world_to_storm`), the APT ``reasoning_examples`` file (:func:`read_reasoning_examples`)
  and ``simplescaling/s1K-1.1`` / ``s1K`` (:func:`s1k_to_storm`).

What the noise can and cannot do. ``E[g] = γ ≈ 0.5772`` (Euler–Mascheroni) and ``Var[g] = π²/6``. The mean
shift ``γ · r`` is added to *every* logit of a position, and softmax ignores a shift shared by all logits, so
it changes neither the loss nor its gradient: only the noise's spread, standard deviation ``r · π/√6``, reaches
the training signal. The gradient with respect to the logits becomes ``softmax(z + r g) - onehot(y)``: on
average the model is pushed to widen its margins until they survive the noise (by Jensen, the expected noisy
loss is above the clean one). At inference, Gumbel noise of ratio r on the logits followed by argmax *is*
sampling at temperature r (the Gumbel-max trick), so "accuracy under logit noise" is accuracy under sampling.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from . import world
from .data import load_storm_data, validate_storm_records
from .lm import build_batch, completion_loss, generate
from .sft import heldout_loss
from .tokenizer import format_prompt
from .training import make_optimizer, optimizer_step, progress
from .world import PERTURBATIONS, perturb_prompt

EULER_GAMMA = 0.5772156649015329  # E[g] for a standard Gumbel variable
GUMBEL_VARIANCE = math.pi**2 / 6   # Var[g]
SCHEDULES = ("cosine", "linear", "constant")
R0_LEVELS = {"conservative": 0.1, "default": 0.3, "aggressive": 0.5}
MAX_RATIO = 1.0
COT_MODES = ("answer", "explicit", "internalise", "internalise_tokens")
THINK, END_THINK = "<think>", "</think>"


# ---------------------------------------------------------------- noise and schedules

def check_ratio(r0, name: str = "r0") -> float:
    """``r0`` as a float, or a clear error: a noise ratio lies in [0, 1] (0.1 conservative, 0.3 default,
    0.5 aggressive; at 1 the noise is as wide as a sampling step at temperature 1)."""
    if isinstance(r0, bool) or not isinstance(r0, (int, float)) or math.isnan(r0) or not 0 <= r0 <= MAX_RATIO:
        raise ValueError(f"{name} must be a number in [0, {MAX_RATIO:g}] (the APT presets: "
                         + ", ".join(f"{k} {v}" for k, v in R0_LEVELS.items()) + f"), got {r0!r}")
    return float(r0)


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; use one of {SCHEDULES}")
    return schedule


def noise_ratio(t: float, r0: float = 0.3, schedule: str = "cosine") -> float:
    """The noise ratio at training progress ``t ∈ [0, 1]``:

    cosine ``r0 (1 + cos πt) / 2``;  linear ``r0 (1 - t)``;  constant ``r0``.

    Cosine and linear start at r0 and end at 0 (the storm calms down); cosine stays high longer, then falls.
    """
    r0 = check_ratio(r0)
    check_schedule(schedule)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"training progress t must lie in [0, 1], got {t!r}")
    if schedule == "cosine":
        return r0 * (1 + math.cos(math.pi * t)) / 2
    if schedule == "linear":
        return r0 * (1 - t)
    return r0


def gumbel_noise(shape, generator: torch.Generator | None = None, device=None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard Gumbel samples by the inverse CDF: ``g = -log(-log u)``, ``u ~ U(0, 1)``.

    ``E[g] = γ ≈ 0.5772``, ``Var[g] = π²/6 ≈ 1.645``. ``u`` is kept inside (0, 1) so g is always finite.
    """
    if generator is not None:
        device = generator.device
    u = torch.rand(shape, generator=generator, device=device, dtype=dtype)
    info = torch.finfo(dtype)
    u = u.clamp(min=info.tiny, max=1 - info.eps)
    return -torch.log(-torch.log(u))


def add_gumbel_noise(logits: torch.Tensor, ratio: float, generator: torch.Generator | None = None,
                     centered: bool = False) -> torch.Tensor:
    """``logits + ratio · g`` (float32), g standard Gumbel, one independent draw per logit.

    ``centered=True`` subtracts the mean: ``logits + ratio · (g - γ)``. Softmax cannot tell the two apart (the
    shift ``ratio · γ`` is the same for every logit of a position): a test checks the losses are equal.
    """
    ratio = check_ratio(ratio, "ratio")
    logits = logits.float()
    if ratio == 0:
        return logits
    g = gumbel_noise(logits.shape, generator, logits.device)
    if centered:
        g = g - EULER_GAMMA
    return logits + ratio * g


def noisy_completion_loss(logits: torch.Tensor, labels: torch.Tensor, ratio: float,
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """The storm loss: :func:`apt_course.lm.completion_loss` on noisy logits.

    L = -(1/N) Σ_{t: label_t ≠ -100} log softmax(z_t + ratio · g_t)[label_t],  g_t ~ Gumbel(0, 1) per logit.

    Only the N completion positions are noised (and kept in memory): with a real vocabulary the full
    (B, T, V) noise tensor would cost as much as the logits. ``ratio = 0`` gives exactly the plain loss.
    """
    ratio = check_ratio(ratio, "ratio")
    shift_labels = labels[:, 1:]
    keep = shift_labels != -100
    z = logits[:, :-1][keep]  # (N, V): the positions that predict a completion token
    return F.cross_entropy(add_gumbel_noise(z, ratio, generator), shift_labels[keep])


# ---------------------------------------------------------------- NEFTune: noise on the input embeddings

def neftune_noise(embeddings: torch.Tensor, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """NEFTune's noise for a (B, L, d) batch of input embeddings: ``U(-m, m)`` per element, ``m = α / √(L·d)``
    (L the padded sequence length, as transformers' ``neftune_post_forward_hook``)."""
    if alpha < 0:
        raise ValueError(f"neftune_alpha must be >= 0 (the paper uses 5, 10 or 15), got {alpha!r}")
    L, d = embeddings.size(1), embeddings.size(2)
    m = alpha / math.sqrt(L * d)
    return torch.zeros_like(embeddings).uniform_(-m, m, generator=generator)


def neftune_hook(alpha: float, generator: torch.Generator | None = None):
    """A forward hook for the input embedding layer that adds :func:`neftune_noise` in training mode only."""

    def hook(module, inputs, output):
        if module.training and alpha > 0:
            return output + neftune_noise(output, alpha, generator)
        return output

    return hook


def activate_neftune(model, alpha: float, generator: torch.Generator | None = None):
    """Hook NEFTune into ``model``'s input embeddings; returns the handle (``handle.remove()`` turns it off)."""
    return model.get_input_embeddings().register_forward_hook(neftune_hook(alpha, generator))


# ---------------------------------------------------------------- stepwise internalisation of the CoT

def curriculum_stage(t: float, n_stages: int) -> int:
    """The curriculum stage at progress ``t ∈ [0, 1]``: stages 0..n_stages, each an equal share of training
    (stage 0 trains the full chain of thought, stage n_stages the answer alone)."""
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"training progress t must lie in [0, 1], got {t!r}")
    return min(n_stages, int(t * (n_stages + 1)))


def removed_steps(n_steps: int, stage: int, n_stages: int) -> int:
    """How many reasoning steps stage ``stage`` of ``n_stages`` removes from the front of an ``n_steps`` chain:
    ``ceil(n_steps · stage / n_stages)`` (0 at stage 0, all of them at the last stage)."""
    if not 0 <= stage <= n_stages:
        raise ValueError(f"stage must lie in 0..{n_stages}, got {stage}")
    return math.ceil(n_steps * stage / n_stages)


def explicit_completion(record: dict) -> str:
    """``<think>step1<sep>step2…</think>answer``: the full chain of thought, then the answer."""
    return staged_completion(record, 0)


def staged_completion(record: dict, removed: int) -> str:
    """The target with the first ``removed`` reasoning steps dropped (Deng et al.'s stepwise internalisation):
    ``<think>`` + the remaining steps + ``</think>`` + answer, or the answer alone once every step is gone."""
    steps = record["steps"]
    if removed < 0:
        raise ValueError(f"removed must be >= 0, got {removed}")
    if removed >= len(steps):
        return record["answer"]
    return THINK + record.get("step_sep", "\n").join(steps[removed:]) + END_THINK + record["answer"]


def n_curriculum_stages(records: list[dict], n_stages: int | None = None) -> int:
    """The curriculum's stage count: ``n_stages`` when given, else one per step of the longest chain (at most 8)."""
    return n_stages or min(8, max(len(r["steps"]) for r in records))


def _chain(record: dict) -> str:
    """The record's whole chain of thought, its steps joined as :func:`staged_completion` joins them."""
    return record.get("step_sep", "\n").join(record["steps"])


def token_staged_completion(record: dict, tokenizer, removed: int) -> str:
    """Deng et al.'s target: the chain with its first ``removed`` *tokens* dropped (cut at a token boundary of
    ``tokenizer``), then ``</think>`` and the answer; the answer alone once every token of the chain is gone."""
    if removed < 0:
        raise ValueError(f"removed must be >= 0, got {removed}")
    chain = _chain(record)
    spans = tokenizer(chain, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if removed >= len(spans):
        return record["answer"]
    return THINK + chain[spans[removed][0]:] + END_THINK + record["answer"]


def chain_tokens(record: dict, tokenizer) -> int:
    """The number of tokens of ``record``'s chain of thought (what :func:`token_staged_completion` removes from)."""
    return len(tokenizer(_chain(record), add_special_tokens=False)["input_ids"])


def token_stage(t: float, n_stages: int, removal_end: float) -> int:
    """Deng et al.'s removal at a constant rate: the stage at progress ``t`` when the ``n_stages``-th (the last
    token gone) is reached at ``removal_end``: ``min(n_stages, ⌊n_stages · t / removal_end⌋)``."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"training progress t must lie in [0, 1], got {t!r}")
    return min(n_stages, int(n_stages * t / removal_end))


def removal_offset(rng: random.Random, smoothing: float) -> int:
    """Deng et al.'s *removal smoothing*: a random extra number of tokens to remove, ``P(o) ∝ exp(-λ o)`` for
    ``o = 0, 1, 2, ...`` (λ = ``smoothing``; they use 4, so o = 0 about 98 % of the time); 0 when λ is 0 (off).
    Sampled by the inverse CDF of that geometric law: ``o = ⌊-ln(u) / λ⌋``."""
    if smoothing < 0:
        raise ValueError(f"removal smoothing λ must be >= 0 (0 = off; Deng et al. use 4), got {smoothing!r}")
    if smoothing == 0:
        return 0
    return int(-math.log(1.0 - rng.random()) / smoothing)


def storm_target(record: dict, cot: str, stage: int, n_stages: int) -> str:
    """What ``record`` trains on at curriculum ``stage``: the answer alone (``cot="answer"``), else its chain with
    the first :func:`removed_steps` steps dropped (:func:`staged_completion`; stage 0 keeps them all)."""
    if cot == "answer":
        return record["answer"]
    if cot == "internalise_tokens":
        raise ValueError("cot='internalise_tokens' removes tokens, so it needs the tokenizer: use "
                         "token_staged_completion(record, tokenizer, removed), as train_storm does")
    return staged_completion(record, removed_steps(len(record["steps"]), stage, n_stages))


# ---------------------------------------------------------------- the trainer

@dataclass
class StormConfig:
    """Settings of :func:`train_storm`.

    steps: optimiser steps; batch_size: examples per step; lr: peak learning rate (warm-up ``warmup`` steps,
    cosine decay to 10 %); seed: the order of the examples, the noise and the initial state of any new weights.

    cot: what is trained — ``"explicit"`` (``<think>steps</think>answer``), ``"answer"`` (the answer alone),
    ``"internalise"`` (the course's step variant: stage 0 trains the full chain, each later stage drops a share
    of each chain's *steps* from the front, the last trains the answer alone; stages share training equally) or
    ``"internalise_tokens"`` (Deng et al. 2024 as written: stage s drops ``s · tokens_per_stage`` *tokens* from
    the front of every chain, plus a :func:`removal_offset` drawn with ``removal_smoothing`` λ; the stages run at
    a constant rate until the longest chain is gone at progress ``removal_end``, and the rest of training is
    on answers alone, as their runs go on after the last token is removed). n_stages: the step variant's
    stages (None: the longest chain's number of steps, at most 8).

    r0: storm noise, the Gumbel ratio at its peak, in [0, 1] (0 = none; APT presets 0.1 / 0.3 / 0.5);
    schedule: its shape over training, ``"cosine"``, ``"linear"`` or ``"constant"`` (see :func:`noise_ratio`).
    neftune_alpha: NEFTune's α for uniform noise on the input embeddings (0 = off; the paper: 5, 10, 15).
    """

    steps: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 10
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 5
    cot: str = "explicit"
    n_stages: int | None = None
    r0: float = 0.0
    schedule: str = "cosine"
    neftune_alpha: float = 0.0
    max_length: int | None = 1024
    tokens_per_stage: int = 4
    removal_smoothing: float = 4.0
    removal_end: float = 0.5

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.cot not in COT_MODES:
            raise ValueError(f"cot must be one of {COT_MODES}, got {self.cot!r}")
        if self.n_stages is not None and (not isinstance(self.n_stages, int) or self.n_stages < 1):
            raise ValueError(f"n_stages must be a positive integer or None, got {self.n_stages!r}")
        if not isinstance(self.tokens_per_stage, int) or self.tokens_per_stage < 1:
            raise ValueError(f"tokens_per_stage must be a positive integer, got {self.tokens_per_stage!r}")
        if not 0 < self.removal_end <= 1:
            raise ValueError(f"removal_end (the training progress by which the chain is gone) must lie in (0, 1], "
                             f"got {self.removal_end!r}")
        if not self.removal_smoothing >= 0:
            raise ValueError(f"removal_smoothing must be >= 0 (0 = off), got {self.removal_smoothing!r}")
        check_ratio(self.r0)
        check_schedule(self.schedule)
        if isinstance(self.neftune_alpha, bool) or not isinstance(self.neftune_alpha, (int, float)) \
                or not self.neftune_alpha >= 0:
            raise ValueError(f"neftune_alpha must be a number >= 0 (0 = off), got {self.neftune_alpha!r}")


def train_storm(model, tokenizer, records: list[dict], config: StormConfig = StormConfig()) -> dict:
    """Fine-tune on reasoning records with storm noise, NEFTune and/or CoT internalisation; the model is
    trained in place.

    Each step: sample ``batch_size`` records, build each one's target for the current curriculum stage,
    forward, add ``r(t) · g`` to the logits of the completion tokens and take the completion-only loss
    (:func:`noisy_completion_loss`). Returns the history ``{"step", "loss" (the noisy loss optimised),
    "clean_loss" (the same logits without noise), "ratio", "stage", "seconds"}``.
    """
    records = validate_storm_records(records)
    device = next(model.parameters()).device
    prompts = [format_prompt(tokenizer, r["problem"]) for r in records]
    n_stages = n_curriculum_stages(records, config.n_stages)
    if config.cot == "internalise_tokens":  # enough stages to remove the longest chain, then answers alone
        n_stages = math.ceil(max(chain_tokens(r, tokenizer) for r in records) / config.tokens_per_stage)
    rng = random.Random(config.seed)
    smoothing_rng = random.Random(f"smoothing:{config.seed}")
    torch.manual_seed(config.seed)
    noise_gen = torch.Generator(device=device).manual_seed(config.seed)
    opt, sched = make_optimizer(model, config.lr, config.steps, config.warmup, config.weight_decay)
    handle = activate_neftune(model, config.neftune_alpha, torch.Generator(device=device).manual_seed(config.seed + 1)) \
        if config.neftune_alpha > 0 else None
    history = {"step": [], "loss": [], "clean_loss": [], "ratio": [], "stage": [], "seconds": 0.0}
    start = time.perf_counter()
    model.train()
    try:
        for step in progress(range(config.steps), f"storm ({config.cot})"):
            t = step / max(1, config.steps - 1)
            ratio = noise_ratio(t, config.r0, config.schedule)
            idx = rng.sample(range(len(records)), min(config.batch_size, len(records)))
            if config.cot == "internalise_tokens":
                stage = token_stage(t, n_stages, config.removal_end)
                targets = [token_staged_completion(records[i], tokenizer, stage * config.tokens_per_stage
                                                   + removal_offset(smoothing_rng, config.removal_smoothing))
                           for i in idx]
            else:
                stage = curriculum_stage(t, n_stages) if config.cot == "internalise" else 0
                targets = [storm_target(records[i], config.cot, stage, n_stages) for i in idx]
            batch = build_batch(tokenizer, [prompts[i] for i in idx], targets, device=device,
                                max_length=config.max_length)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = noisy_completion_loss(logits, batch["labels"], ratio, noise_gen)
            optimizer_step(loss, model, opt, sched)
            if step % config.log_every == 0 or step == config.steps - 1:
                with torch.no_grad():
                    clean = completion_loss(logits.detach(), batch["labels"]).item()
                history["step"].append(step)
                history["loss"].append(loss.item())
                history["clean_loss"].append(clean)
                history["ratio"].append(ratio)
                history["stage"].append(stage)
    finally:
        if handle is not None:
            handle.remove()
    history["seconds"] = time.perf_counter() - start
    return history


# ---------------------------------------------------------------- measuring

def answer_correct(record: dict, completion: str) -> bool:
    """The final answer (after ``</think>`` if any) equals the record's answer."""
    return world.extract_final_answer(completion) == str(record["answer"]).strip()


@torch.no_grad()
def evaluate_storm(model, tokenizer, records: list[dict], max_new_tokens: int = 24, temperature: float = 1.0,
                   seed: int = 0, perturbations=PERTURBATIONS, completions: bool = False) -> dict:
    """Answer accuracy on ``records`` (the final answer, whatever the model writes before it):

    ``acc`` greedy; ``acc_sampled`` one sample at ``temperature`` (the same as Gumbel noise of ratio
    ``temperature`` on the logits at inference, then argmax); ``acc_<kind>`` greedy on perturbed prompts;
    ``tokens_per_answer`` the mean number of tokens the greedy model writes before its EOS; ``examples`` the first
    three greedy replies (``completions``: all of them, for grading them another way without generating again).
    """
    records = validate_storm_records(records, "evaluation set")
    prompts = [format_prompt(tokenizer, r["problem"]) for r in records]
    variants = {"acc": prompts}
    for kind in perturbations:
        variants[f"acc_{kind}"] = [format_prompt(tokenizer, perturb_prompt(r["problem"], kind)) for r in records]
    all_prompts = [p for ps in variants.values() for p in ps]
    outs = generate(model, tokenizer, all_prompts, max_new_tokens=max_new_tokens)
    result, n = {}, len(records)
    for j, name in enumerate(variants):
        chunk = outs[j * n:(j + 1) * n]
        result[name] = sum(answer_correct(r, o) for r, o in zip(records, chunk)) / n
        if name == "acc":
            result["tokens_per_answer"] = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"])
                                              for o in chunk) / n
            result["examples"] = chunk[:3]
            if completions:
                result["completions"] = chunk
    torch.manual_seed(seed)
    sampled = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=True,
                       temperature=temperature)
    result["acc_sampled"] = sum(answer_correct(r, o) for r, o in zip(records, sampled)) / n
    return result


def compare_conditions(start_model, tokenizer, train: list[dict], test: list[dict], conditions: dict,
                       eval_kwargs: dict | None = None, keep_models: bool = False, lora_r: int = 0) -> dict:
    """Train a copy of ``start_model`` under each condition (``{name: StormConfig}``) and measure it.

    Returns ``{name: {"metrics": evaluate_storm(...) + {"train_seconds"}, "history": ..., "model": ...}}``
    (the model only with ``keep_models``). Every condition sees the same examples in the same order (the
    configs share a seed), so differences come from the condition, not the data. ``lora_r > 0``: each copy trains
    LoRA adapters of that rank (:func:`~apt_course.sft.add_lora`, the same initial adapters for every condition)
    instead of all its weights.
    """
    from .sft import add_lora

    out = {}
    for name, config in conditions.items():
        model = copy.deepcopy(start_model)
        if lora_r:
            model = add_lora(model, r=lora_r, seed=config.seed)
        history = train_storm(model, tokenizer, train, config)
        metrics = evaluate_storm(model, tokenizer, test, **(eval_kwargs or {}))
        metrics["train_seconds"] = history["seconds"]
        out[name] = {"metrics": metrics, "history": history, "config": asdict(config)}
        if keep_models:
            out[name]["model"] = model
    return out


# ---------------------------------------------------------------- the chapter's experiment

def cot_conditions(base: StormConfig) -> dict:
    """Three ways to spend the same budget on a model that reasons on paper: train the answer alone; internalise
    the chain by steps (the course's adaptation); internalise it by tokens (Deng et al. 2024)."""
    return {"answer_only": replace(base, cot="answer"), "internalised_steps": replace(base, cot="internalise"),
            "internalised_tokens": replace(base, cot="internalise_tokens")}


def noise_conditions(base: StormConfig, r0: float = R0_LEVELS["default"], neftune_alpha: float = 5.0,
                     full_grid: bool = False) -> dict:
    """The storm stage's conditions at one budget: no noise; storm noise under each schedule at ``r0``; the
    other r0 presets (``storm_cosine_conservative`` 0.1, ``storm_cosine_aggressive`` 0.5) on the cosine schedule
    (on every schedule with ``full_grid``); NEFTune with ``neftune_alpha``."""
    out = {"noise_free": replace(base, r0=0.0, neftune_alpha=0.0)}
    for schedule in SCHEDULES:
        out[f"storm_{schedule}"] = replace(base, r0=r0, schedule=schedule, neftune_alpha=0.0)
    for level_name, level in R0_LEVELS.items():
        for schedule in (SCHEDULES if full_grid else ("cosine",)):
            if level != r0:
                out[f"storm_{schedule}_{level_name}"] = replace(base, r0=level, schedule=schedule, neftune_alpha=0.0)
    out["neftune"] = replace(base, r0=0.0, neftune_alpha=neftune_alpha)
    return out


@dataclass
class StudyConfig:
    """The chapter's experiment (the notebook runs it at one seed, ``benchmarks/storm_sweep.py`` at several),
    on ``digits``-digit held-out sums, from the shipped checkpoint ``start`` (``cot``: it writes the chain and
    gets nearly every sum right, so both parts start from competence).

    Part 1, *taking the written chain away* (``cot_steps`` steps each at ``lr``): answer-only training,
    step-internalisation, token-internalisation. Part 2, *the storm stage* (``storm_steps`` steps each at
    ``storm_lr`` after ``storm_warmup`` warm-up steps, on the explicit chain): no noise, storm noise under each
    schedule, the r0 levels, NEFTune. n_train / n_test: train records and held-out sums.
    """

    cot_steps: int = 60
    storm_steps: int = 16
    batch_size: int = 32
    lr: float = 3e-3
    storm_lr: float = 1e-3
    storm_warmup: int = 4
    n_train: int = 4000
    n_test: int = 120
    digits: int = 3
    start: str = "cot"
    r0: float = R0_LEVELS["default"]
    neftune_alpha: float = 5.0
    full_grid: bool = False
    max_new_tokens: int = 32
    temperature: float = 1.0


def run_study(seed: int, study: StudyConfig = StudyConfig(), start=None) -> dict:
    """Both parts of the experiment at one seed: ``{"start": evaluate_storm(start model), "cot":
    compare_conditions(...), "storm": ...}``, every part from the same start.

    ``start``: ``(model, tokenizer)`` to begin from (default: the shipped checkpoint ``study.start``)."""
    from .checkpoints import load_checkpoint

    model, tokenizer = start if start is not None else load_checkpoint(study.start)
    train, test = load_storm_data("tiny", n_train=study.n_train, n_test=study.n_test, seed=seed, digits=study.digits)
    eval_kwargs = {"max_new_tokens": study.max_new_tokens, "temperature": study.temperature, "seed": seed}
    start_figures = evaluate_storm(model, tokenizer, test, **eval_kwargs)
    base = StormConfig(steps=study.cot_steps, batch_size=study.batch_size, lr=study.lr, seed=seed)
    cot = compare_conditions(model, tokenizer, train, test, cot_conditions(base), eval_kwargs)
    storm_base = StormConfig(steps=study.storm_steps, batch_size=study.batch_size, lr=study.storm_lr,
                             warmup=study.storm_warmup, cot="explicit", seed=seed)
    storm = compare_conditions(model, tokenizer, train, test,
                               noise_conditions(storm_base, study.r0, study.neftune_alpha, study.full_grid),
                               eval_kwargs)
    return {"start": start_figures, "cot": cot, "storm": storm}


# ---------------------------------------------------------------- the real SmolLM2 on a CPU (profile smol)

@dataclass
class SmolStudy:
    """Chapter 12 on the real SmolLM2-135M-Instruct (profile ``smol``): three two-digit numbers summed in English
    (``"What is 49 plus 75 plus 97?"``, :func:`~apt_course.data.load_storm_data`), the running total as the chain
    (``<think>49 + 75 = 124; 124 + 97 = 221</think>221``). From the instruct model (which never writes that
    format), ``steps`` LoRA steps (rank ``lora_r``) of each condition of :func:`smol_conditions` at ``lr``;
    greedy and sampled accuracy on ``n_test`` held-out questions, ``max_new_tokens`` each."""

    steps: int = 20
    batch_size: int = 8
    lr: float = 2e-3
    warmup: int = 3
    lora_r: int = 8
    r0: float = R0_LEVELS["default"]
    schedule: str = "cosine"
    n_train: int = 400
    n_test: int = 40
    digits: int = 2
    max_new_tokens: int = 40
    temperature: float = 1.0


def smol_conditions(study: SmolStudy, seed: int) -> dict:
    """The same budget spent three ways: the answer alone; the written chain; the written chain in the storm
    (Gumbel noise of ratio ``study.r0`` on ``study.schedule``)."""
    base = StormConfig(steps=study.steps, batch_size=study.batch_size, lr=study.lr, warmup=study.warmup, seed=seed,
                       cot="explicit", r0=0.0)
    return {"answer_only": replace(base, cot="answer"), "explicit": base,
            f"storm_{study.schedule}": replace(base, r0=study.r0, schedule=study.schedule)}


def run_smol_study(model, tokenizer, seed: int, study: SmolStudy = SmolStudy()) -> dict:
    """:class:`SmolStudy` at one seed: ``{"start": evaluate_storm(the model as it is), "conditions":
    compare_conditions(...), "train", "test"}``. The model itself is not changed."""
    train, test = load_storm_data("smol", n_train=study.n_train, n_test=study.n_test, seed=seed, digits=study.digits)
    eval_kwargs = {"max_new_tokens": study.max_new_tokens, "temperature": study.temperature, "seed": seed,
                   "perturbations": ()}
    start = evaluate_storm(model, tokenizer, test, **eval_kwargs)
    conditions = compare_conditions(model, tokenizer, train, test, smol_conditions(study, seed), eval_kwargs,
                                    lora_r=study.lora_r)
    return {"start": start, "conditions": conditions, "train": train, "test": test}


# ---------------------------------------------------------------- a real model (the notebook's PROFILE = "gpu")

def completion_nll(model, tokenizer, records: list[dict], target: str = "answer", batch_size: int = 8,
                   max_length: int | None = 1024) -> float:
    """Mean per-token NLL of held-out targets (chapter 04's :func:`~apt_course.sft.heldout_loss`):
    ``target = "answer"`` (the answer alone: what an internalised model must produce) or ``"explicit"``
    (chain + answer)."""
    if target not in ("answer", "explicit"):
        raise ValueError(f"target must be 'answer' or 'explicit', got {target!r}")
    examples = [{"prompt": r["problem"], "completion": r["answer"] if target == "answer" else explicit_completion(r)}
                for r in records]
    return heldout_loss(model, tokenizer, examples, batch_size, max_length)


def run_real_profile(profile, steps: int = 30, batch_size: int = 2, lr: float = 1e-5, seed: int = 0,
                     device="cpu", n_train: int = 200, n_test: int = 16, max_new_tokens: int | None = None,
                     reasoning_file=None, r0: float = R0_LEVELS["default"], schedule: str = "cosine",
                     n_stages: int = 4) -> dict:
    """The storm stage on a real model: the profile's model, its reasoning data through :func:`s1k_to_storm`
    (or an APT ``reasoning_file``), ``steps`` steps of storm noise + stepwise internalisation.

    s1K answers are free text, so exact-match accuracy means little here; the figures are the held-out NLL of
    the answer alone and of chain + answer, before and after, and the tokens the model writes per answer.
    Returns ``{"metrics": {...}, "history": ..., "model": ..., "tokenizer": ...}``.
    """
    from .profiles import get_profile, load_model
    from .utils import get_dtype

    profile = get_profile(profile) if isinstance(profile, str) else profile
    device = torch.device(device)
    model, tokenizer = load_model(profile, "sft", device=device, dtype=get_dtype(device))
    train, test = load_storm_data(profile, n_train=n_train, n_test=n_test, seed=seed, reasoning_file=reasoning_file)
    max_length = min(int(getattr(tokenizer, "model_max_length", 2048) or 2048), 2048)
    metrics = {"nll_answer_before": completion_nll(model, tokenizer, test, "answer", max_length=max_length),
               "nll_explicit_before": completion_nll(model, tokenizer, test, "explicit", max_length=max_length)}
    config = StormConfig(steps=steps, batch_size=batch_size, lr=lr, warmup=max(1, steps // 10), seed=seed,
                         cot="internalise", n_stages=n_stages, r0=r0, schedule=schedule, max_length=max_length)
    history = train_storm(model, tokenizer, train, config)
    metrics["nll_answer_after"] = completion_nll(model, tokenizer, test, "answer", max_length=max_length)
    metrics["nll_explicit_after"] = completion_nll(model, tokenizer, test, "explicit", max_length=max_length)
    outs = generate(model, tokenizer, [format_prompt(tokenizer, r["problem"]) for r in test],
                    max_new_tokens=max_new_tokens or profile.max_new_tokens, batch_size=8)
    metrics["tokens_per_answer"] = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outs) / len(outs)
    metrics["train_seconds"] = history["seconds"]
    return {"metrics": metrics, "history": history, "model": model, "tokenizer": tokenizer, "examples": outs[:2],
            "n_train": len(train), "n_test": len(test)}
