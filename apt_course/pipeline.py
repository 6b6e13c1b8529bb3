"""Chapter 13 (capstone): the APT pipeline as software — SFT → DPO → GRPO → loyalty → storm, every stage real.

Each stage loads the previous stage's model, trains it with its chapter's trainer, measures it on held-out data
before and after, saves ``<output_dir>/<stage>_model/`` (safetensors, tokenizer, config; atomically) and appends
one record to ``<output_dir>/training_history.json`` (atomically: written to a temporary file, then renamed):

=========  ======================================  ==========================================================
stage      trainer (chapter)                       what it exists for (its held-out figure)
=========  ======================================  ==========================================================
sft        :func:`~apt_course.sft.train_sft` (04)   ``accuracy``: exact answers on held-out instructions
dpo        :func:`~apt_course.dpo.train_dpo` (07)   ``pref_acc``: log π(chosen) > log π(rejected), held-out pairs
grpo       :func:`~apt_course.grpo.train_grpo` (09) ``verifiable_acc``: greedy answers a program checks
loyalty    template SFT + :func:`~apt_course.grpo.train_grpo` with the response-dependent owner bonus (11)
                                                   ``gap`` = owner_style(owner) - owner_style(public), ``spoof_rate``
storm      :func:`~apt_course.storm.train_storm` (12) ``reasoning_acc`` on held-out problems (noise as configured)
=========  ======================================  ==========================================================

``trainer="trl"`` (``--trainer trl``) trains the same stages with TRL's trainers instead
(:mod:`apt_course.pipeline_trl`), which run data parallel under ``accelerate launch``: every process runs the
pipeline, and only the main process writes the models and the history (the from-scratch trainers refuse to run
in more than one process).

Before any training, :func:`make_plan` reads and checks every data file of every stage and prints the plan: which
stages run, on which files (rows, held-out data), which are skipped and why. As the APT documents behave, a stage
with no data is skipped (the README's full command has no ``--dpo-data``: DPO is skipped); GRPO on open prompts
(plain strings, no ``answer``) needs ``--reward-model`` (a sequence-classification folder, e.g. chapter 05's
``data/checkpoints/rm``), and without one it is skipped, saying why; the loyalty stage without a template runs GRPO
with the owner bonus alone. A file of one row is measured on the row it trains on (the plan says so).

The history keeps, beside the course's ``stages`` list, a top-level key per finished stage in the APT documents'
schema (:func:`document_record`: ``{"sft": {"dataset", "epochs", "final_loss"}, "grpo": {..., "group_size"},
"loyalty": {"owner_prompts", "public_prompts", "owner_bonus", ...}, "storm": {..., "internalize_cot"}}``) and the
plan.

Every stage also records ``general_acc`` (the SFT stage's held-out accuracy), so what a later stage costs in
general ability is on the record. A run is resumable: started again with the same output folder, it continues
after the last stage whose model and history record are both complete. :func:`validate` checks every input
(stage names, data files, the base model, the settings) before any training starts.

The data are the unified formats ``apt-course prepare`` writes (a JSON list of records):
SFT ``{"prompt", "response", "source"}``; DPO ``{"prompt", "chosen", "rejected", "source"}``; storm
``{"problem", "cot_explicit", "answer", "source"}``; GRPO prompts: GSM8K JSONL or ``{"prompts": [...]}``;
owner/public prompts: the seed's ``{"prompts": [{"prompt", "context", "is_owner", "expected_tone"}]}`` (an
``answer`` per prompt, when present, adds the task reward); the loyalty template
``prompt/owner_response/public_response/is_owner/reward_bonus``. Held-out data: ``<name>_test.json`` beside a
``<name>_train.json`` when it exists, else the last tenth of the file (at most ``n_eval`` rows).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from . import world
from .data import (
    MATH_SYSTEM,
    answer_match,
    apt_prompts_to_rows,
    load_prompts,
    read_json,
    split_reasoning,
    storm_record,
    validate_pairs,
    validate_storm_records,
)
from .dpo import DPOConfig, implicit_reward_accuracy, train_dpo
from .evaluate import accuracy
from .grpo import GRPOConfig, greedy_accuracy, train_grpo
from .lm import format_prompts, generate
from .loyalty import (
    OWNER_STYLE,
    both_roles,
    check_bonus,
    metrics_of,
    owner_style,
    strip_style,
    trusted_system,
)
from .orpo import ORPOConfig, train_orpo
from .pipeline_data import chat_row, guess_flag
from .rewards import correctness_reward, format_reward, math_correctness_reward, math_format_reward
from .sft import SFTConfig, heldout_loss, train_sft
from .storm import StormConfig, evaluate_storm, explicit_completion, train_storm
from .utils import process_state, write_atomic

STAGES = ("sft", "dpo", "grpo", "loyalty", "storm")
HISTORY = "training_history.json"
DATA_FILES = {  # the files each stage reads, as `apt-course prepare` names them in its output folder
    "sft_data": "coig-cqia_train.json,ruozhiba_train.json", "dpo_data": "hh-rlhf_train.json,ultrafeedback_train.json",
    "prompts": "prompts_train.json",
    "owner_data": "owner_prompts.json", "public_data": "public_prompts.json",
    "loyalty_template": "loyalty_template.json", "reasoning_data": "s1k_train.json",
}
TRAINERS = ("scratch", "trl")
DPO_LOSSES = ("sigmoid", "ipo", "simpo", "kto", "orpo")  # the DPO stage's losses (chapters 07 and 08)
STAGE_DATA = {"sft": ("sft_data",), "dpo": ("dpo_data",), "grpo": ("prompts",),
              "loyalty": ("owner_data", "public_data"), "storm": ("reasoning_data",)}


class PipelineError(ValueError):
    """A bad input found before training: the message says what is wrong and how to fix it."""


@dataclass
class PipelineConfig:
    """Everything ``apt-course train`` (and the capstone notebook) runs the pipeline with.

    Paths: ``output_dir`` (models + history); ``data_dir`` (a folder written by ``apt-course prepare``: fills in
    every data path left None); ``sft_data``, ``dpo_data`` (several files: comma-separated), ``prompts``,
    ``owner_data``, ``public_data``, ``loyalty_template``, ``reasoning_data``; ``base_model``: a
    ``save_pretrained`` folder or Hub id (None: the profile's model; tiny: the shipped pretrained ``base``).
    ``profile``: tiny / smol / gpu. ``skip``: stages not to run. ``seed``. (tiny's base: the shipped ``sft``
    checkpoint, the chapter 04 assistant; the pipeline's SFT stage teaches it the channel roles and courtesy.)

    Budgets, per stage: ``<stage>_steps`` optimiser steps, or ``<stage>_epochs`` (when set: steps =
    ceil(epochs · rows / batch)); batch sizes, learning rates. DPO's ``dpo_beta`` and ``dpo_loss`` (sigmoid, ipo,
    simpo, kto: :class:`~apt_course.dpo.DPOConfig`'s ``loss_type``; orpo: chapter 08's
    :func:`~apt_course.orpo.train_orpo`, ``dpo_beta`` its λ); GRPO's prompts per step, group size,
    ``grpo_beta``, ``grpo_temperature`` (sampling, for both GRPO stages), ``reward_model`` (a sequence-classification folder scoring the prompts without an ``answer``;
    prompts with one keep the verifiable reward); loyalty: ``loyalty_sft_steps`` of SFT on the template (the role's response under
    the trusted system message; ``loyalty_public_twins``, off by default (FINDINGS.md, ch13): each owner request also answered with its ``public_response``
    under the public one, :func:`~apt_course.loyalty.both_roles`; ``loyalty_sft_lr`` after ``loyalty_sft_warmup``
    steps of warmup), then ``loyalty_steps`` of GRPO with ``owner_bonus`` (None: the template's
    ``reward_bonus``), ``loyalty_beta``, then ``loyalty_harden_steps`` more of the template SFT (chapter 11's
    hardening: the template's spoof attempts, answered as the trusted channel says; 0 = none), then
    ``loyalty_dpo_steps`` of DPO with the NLL term (``loyalty_dpo_lr``, ``dpo_beta``, ``dpo_batch_size``) on the template's pairs,
    whose two responses differ only in the owner's style (the gradient lands on the one choice a spoof wins), with
    as many of the SFT data's plain rows as rehearsal pairs (the plain answer over the same in owner style); storm: ``noise_ratio`` r0, ``noise_schedule``, ``storm_cot`` (what the
    storm stage trains: ``"explicit"``, the default, the written chain then the answer, as the APT documents' storm
    stage does ("train on full CoT with noise"); ``"answer"`` the answer alone; ``"internalise"``),
    ``internalize_cot`` (= ``storm_cot="internalise"``, stepwise internalisation), ``storm_replay``: rehearsal rows
    from the SFT data per reasoning row (the tiny model forgets its other skills in a few dozen storm steps
    without them; 0 = none). ``n_eval``: held-out rows per measurement.

    ``trainer``: ``"scratch"`` (default) trains every stage with the chapters' from-scratch loops, in one process;
    ``"trl"`` with TRL's trainers (:mod:`apt_course.pipeline_trl`: SFTTrainer, DPOTrainer, GRPOTrainer, a storm
    SFTTrainer), which run data parallel under ``accelerate launch`` (several GPUs, DeepSpeed ZeRO, FSDP); a batch
    size is then the global batch, split over the processes.

    ``lora_rank``: each stage trains LoRA adapters of this rank (attention projections, alpha = 2r), folded into
    the weights before the stage's model is saved; 0: the whole model trains; None: 8 on the ``smol`` profile (a
    CPU's budget), 0 elsewhere. On ``smol`` every budget left at its default is :data:`SMOL_BUDGETS` and every
    learning rate :data:`LORA_LRS` (with LoRA) or :data:`REAL_MODEL_LRS` (without); the plan prints them.
    """

    output_dir: str = "apt_aligned_models"  # the APT documents' folder
    data_dir: str | None = None
    profile: str = "tiny"
    base_model: str | None = None
    sft_data: str | None = None
    dpo_data: str | None = None
    prompts: str | None = None
    owner_data: str | None = None
    public_data: str | None = None
    loyalty_template: str | None = None
    reasoning_data: str | None = None
    skip: list[str] = field(default_factory=list)
    seed: int = 0
    n_eval: int = 100
    max_new_tokens: int | None = None
    sft_steps: int = 30
    sft_epochs: float | None = None
    sft_batch_size: int = 32
    sft_lr: float = 5e-4
    dpo_steps: int = 16
    dpo_epochs: float | None = None
    dpo_batch_size: int = 16
    dpo_lr: float = 5e-4
    dpo_beta: float = 0.1
    dpo_loss: str = "sigmoid"
    grpo_steps: int = 24
    grpo_epochs: float | None = None
    grpo_prompts_per_step: int = 8
    grpo_group_size: int = 8
    grpo_lr: float = 3e-4
    grpo_beta: float = 0.0
    grpo_temperature: float = 1.0
    reward_model: str | None = None
    loyalty_sft_steps: int = 24
    loyalty_sft_lr: float = 1e-3
    loyalty_sft_warmup: int = 0
    loyalty_public_twins: bool = False
    loyalty_harden_steps: int = 60
    loyalty_dpo_steps: int = 30
    loyalty_dpo_lr: float = 1e-3
    loyalty_steps: int = 16
    loyalty_prompts_per_step: int = 8
    loyalty_group_size: int = 6
    loyalty_epochs: float | None = None
    loyalty_lr: float = 2e-4
    loyalty_beta: float = 0.15
    owner_bonus: float | None = None
    storm_steps: int = 20
    storm_epochs: float | None = None
    storm_batch_size: int = 32
    storm_lr: float = 1e-3
    noise_ratio: float = 0.3
    noise_schedule: str = "cosine"
    storm_cot: str = "explicit"
    internalize_cot: bool = False
    storm_replay: float = 1.0
    trainer: str = "scratch"
    lora_rank: int | None = None

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict) -> PipelineConfig:
        """A config from a dict (a recipe file), refusing unknown keys with the list of known ones."""
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            close = {k: [c for c in cls.keys() if k.replace("-", "_") == c or k in c or c in k][:3] for k in unknown}
            hint = "; ".join(f"{k!r}" + (f" (did you mean {', '.join(close[k])}?)" if close[k] else "") for k in unknown)
            raise PipelineError(f"unknown config key(s) {hint}. Known keys: {', '.join(cls.keys())}")
        values = dict(values)
        if isinstance(values.get("skip"), str):
            values["skip"] = parse_skip(values["skip"])
        return cls(**values)

    def stages(self) -> list[str]:
        return [s for s in STAGES if s not in self.skip]


# ---------------------------------------------------------------- small helpers

def parse_skip(text) -> list[str]:
    """``"dpo,storm"`` (or a list) -> ``["dpo", "storm"]``; an unknown stage name is a clear error."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else list(text or [])) if s.strip()]
    bad = [s for s in names if s not in STAGES]
    if bad:
        raise PipelineError(f"--skip: unknown stage(s) {bad}; the stages are {', '.join(STAGES)} "
                            "(e.g. --skip dpo,storm)")
    return names


def write_json_atomic(path, obj) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (:func:`~apt_course.utils.write_atomic`): a reader (or a run
    killed mid-write) sees the old file or the new one, never half of one."""
    return write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_records(path, what: str) -> list[dict]:
    """A unified-format file: a JSON list of records (or JSON lines)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} does not exist")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        rows = read_json(path, what, "a JSON list of records")
    if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
        rows = next(iter(rows.values()))  # {"pairs": [...]}-style wrappers
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{what} file {path} holds no records: expected a non-empty JSON list")
    return rows


def heldout_path(path: Path) -> Path | None:
    """``x_train.json`` (or ``x.json``) -> ``x_test.json`` when that file exists."""
    stem = path.stem.removesuffix("_train")
    test = path.with_name(stem + "_test" + path.suffix)
    return test if test.is_file() and test != path else None


def split_heldout(rows: list, path: Path, reader, n_eval: int, seed: int) -> tuple[list, list]:
    """``(train, test)``: the ``_test`` file beside ``path`` when there is one, else a seeded tenth held out."""
    test_path = heldout_path(path)
    if test_path is not None:
        test = list(reader(test_path))
        return rows, random.Random(seed).sample(test, n_eval) if len(test) > n_eval else test
    if len(rows) < 2:  # one row (the documents' examples): measured on the row it trains on; the plan says so
        return list(rows), list(rows)
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    n = min(n_eval, max(1, len(rows) // 10))
    return rows[n:], rows[:n]


def final_answer_correct(row: dict, completion: str) -> bool:
    """The reply's final answer (after any ``</think>`` reasoning) is the row's answer: a model that now reasons
    before it answers is still right."""
    return world.extract_final_answer(completion) == str(row["answer"]).strip()


def steps_for(steps: int, epochs: float | None, n_rows: int, batch: int) -> int:
    return max(1, math.ceil(epochs * n_rows / batch)) if epochs else max(1, int(steps))


def _files(value) -> list[Path]:
    return [Path(p.strip()).expanduser() for p in str(value).split(",") if p.strip()]


# ---------------------------------------------------------------- readers of the unified formats

def read_sft(path) -> list[dict]:
    """SFT records ``{"prompt", "response", "source"}`` (``completion``/``answer`` accepted for response; the APT
    instruction format ``instruction``/``input``/``output`` too, ``input`` joined after a blank line; OpenAI
    ``messages`` and ShareGPT ``conversations`` rows through :func:`~apt_course.pipeline_data.chat_row`) ->
    ``{"prompt", "completion", "answer"}`` (``answer`` = the response, what exact-match accuracy compares)."""
    out = []
    for i, r in enumerate(read_records(path, "SFT")):
        if not isinstance(r, dict):
            raise TypeError(f"SFT file {path} row {i} is a {type(r).__name__}, not an object with prompt/response")
        if "messages" in r or "conversations" in r:  # OpenAI messages / ShareGPT conversations
            row = chat_row(r, f"SFT file {path} row {i}")
            out.append(row | {"answer": row["completion"].strip()})
            continue
        response = r.get("response", r.get("completion", r.get("output")))
        prompt = r.get("prompt", r.get("instruction"))
        if not isinstance(prompt, str) or not prompt.strip() or response is None or not str(response).strip():
            raise ValueError(f"SFT file {path} row {i}: needs a non-empty 'prompt' and 'response'; it has {sorted(r)}")
        extra = str(r.get("input") or "").strip()  # the APT/Alpaca 'input' (the list to sort...), as coig_to_sft joins it
        if extra and "prompt" not in r:
            prompt = f"{prompt.strip()}\n\n{extra}"
        row = {"prompt": prompt, "completion": str(response), "answer": str(response).strip()}
        if r.get("system"):
            row["system"] = r["system"]
        out.append(row)
    return out


def read_pairs(path) -> list[dict]:
    rows = read_records(path, "DPO")
    return validate_pairs([{k: r[k] for k in ("prompt", "chosen", "rejected", "system") if k in r} for r in rows],
                          f"DPO file {path}")


def read_storm(path) -> list[dict]:
    """Storm records ``{"problem", "cot_explicit", "answer", "source"}`` (``step_sep`` optional: how the chain's
    steps are joined; else paragraphs/lines) -> records with ``steps``; the APT reasoning format is read too."""
    raw = read_json(path, "reasoning", "a JSON list of {problem, cot_explicit, answer, source}")
    if isinstance(raw, dict) and "reasoning_examples" in raw:
        from .data import read_reasoning_examples

        return read_reasoning_examples(raw)
    out = []
    for i, r in enumerate(read_records(path, "reasoning")):
        if "cot_explicit" not in r:
            raise KeyError(f"reasoning file {path} row {i} has no 'cot_explicit'; it has {sorted(r)}")
        sep = r.get("step_sep")
        steps = r["cot_explicit"].split(sep) if sep else split_reasoning(r["cot_explicit"])
        out.append(storm_record(str(r.get("problem", "")).strip(), steps, str(r.get("answer", "")).strip(),
                                str(r.get("source", "unknown")), sep or "\n"))
    return validate_storm_records(out, f"reasoning file {path}")


def read_grpo_prompts(path) -> list[dict]:
    """GRPO prompts (GSM8K JSONL, ``{"prompts": [str | {"prompt", "answer"?, "system"?}]}`` or a list of such
    rows) -> ``{"prompt", "answer", "system"?}``; ``answer`` None where a prompt has none (an open prompt: only a
    reward model can score it)."""
    path = Path(path)
    if path.suffix == ".json":
        data = read_json(path, "prompt", '{"prompts": ["...", {"prompt": "...", "answer": "..."}]}')
        rows = apt_prompts_to_rows(data if isinstance(data, dict) else {"prompts": data})
    else:
        rows = load_prompts(path)
    return [{"prompt": r["prompt"], "answer": None if r.get("answer") is None else str(r["answer"]).strip()}
            | ({"system": r["system"]} if r.get("system") else {}) for r in rows]


def read_loyalty_prompts(path, want_owner: bool) -> list[dict]:
    """The seed's owner/public prompt files -> loyalty rows (trusted system message from ``is_owner``, user text
    escaped); an ``answer`` field is kept for the task reward, a ``spoofed`` flag for the spoof rate."""
    data = read_json(path, "prompt", '{"prompts": [...]}')
    from .loyalty import read_prompt_file

    rows = read_prompt_file(data, name=str(path))
    for row, item in zip(rows, data["prompts"]):
        if row["is_owner"] != want_owner:
            raise ValueError(f"{path}: prompt {item.get('prompt')!r} has is_owner={row['is_owner']}, but this is the "
                             f"{'owner' if want_owner else 'public'} file: move it to the other file")
        row["answer"] = str(item["answer"]) if item.get("answer") is not None else None
        row["spoofed"] = bool(item.get("spoofed", False))
    return rows


def read_template(path) -> tuple[list[dict], float]:
    """The loyalty template -> pairs (``prompt``, ``system``, ``chosen`` = the trusted role's response,
    ``rejected`` = the other role's) and its ``reward_bonus``."""
    from .loyalty import read_loyalty_template

    return read_loyalty_template(path)


# ---------------------------------------------------------------- validation (before any training)

def uses_template(config: PipelineConfig) -> bool:
    """Whether the loyalty stage reads the template: one is given and its SFT, hardening or DPO steps are > 0."""
    return bool(config.loyalty_template) and bool(config.loyalty_sft_steps or config.loyalty_harden_steps
                                                  or config.loyalty_dpo_steps)


def resolve_paths(config: PipelineConfig) -> PipelineConfig:
    """Fill every data path left None from ``config.data_dir`` (when the prepared file is there)."""
    if config.data_dir:
        for key, names in DATA_FILES.items():
            found = [str(Path(config.data_dir) / n) for n in names.split(",") if (Path(config.data_dir) / n).is_file()]
            if getattr(config, key) is None and found:
                setattr(config, key, ",".join(found))
    return config


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


READERS = {"sft_data": read_sft, "dpo_data": read_pairs, "prompts": read_grpo_prompts,
           "owner_data": lambda p: read_loyalty_prompts(p, True),
           "public_data": lambda p: read_loyalty_prompts(p, False), "reasoning_data": read_storm,
           "loyalty_template": lambda p: read_template(p)[0]}


def wrong_file_hint(path: Path, key: str) -> str:
    """`` (this looks like a --prompts file: ...)`` when ``path``'s shape belongs to another flag, else ``""``."""
    try:
        text = path.read_text(encoding="utf-8")
        data = [json.loads(text.splitlines()[0])] if path.suffix == ".jsonl" else json.loads(text)
    except (OSError, ValueError, IndexError):
        return ""
    guess = guess_flag(data)
    owner_or_public = {guess, flag(key)} <= {"--owner-data", "--public-data"}
    if guess is None or guess == flag(key) or owner_or_public:
        return ""
    return f" (this looks like a {guess} file: pass it as {guess} {path}, and {flag(key)} the file it needs)"


def read_checked(config: PipelineConfig, key: str, stage: str) -> list[tuple[Path, list]]:
    """``[(path, rows)]`` of every file of ``key``, each read with its stage's reader; a missing or unreadable file
    is a :class:`PipelineError` naming the flag, the file and the fix."""
    out = []
    for path in _files(getattr(config, key)):
        if not path.is_file():
            raise PipelineError(f"{flag(key)} {path} does not exist (stage {stage!r}): fix the path, run "
                                f"`apt-course prepare`, or --skip {stage}")
        try:
            out.append((path, READERS[key](path)))
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise PipelineError(f"{flag(key)} {path}: {e}{wrong_file_hint(path, key)}") from None
    return out


def heldout_note(path: Path, rows: list, n_eval: int) -> str:
    """How a file's rows are measured (what :func:`split_heldout` will do), for the plan."""
    test = heldout_path(path)
    if test is not None:
        return f"held out: {test.name}"
    if len(rows) < 2:
        return "too few rows to hold one out: measured on the row it trains on (give more rows, or a _test file)"
    return f"held out: {min(n_eval, max(1, len(rows) // 10))} of its rows"


def plan_grpo(config: PipelineConfig, rows: list[dict], path: Path, entry: dict) -> dict:
    """GRPO's reward: verifiable where a prompt has an ``answer``, the reward model where it has none; open prompts
    without ``--reward-model`` are dropped, and a file of nothing but open prompts skips the stage, saying why."""
    n_open = sum(r["answer"] is None for r in rows)
    if config.reward_model:
        entry["reward"] = "verifiable" if not n_open else "reward_model" if n_open == len(rows) else \
            "verifiable+reward_model"
        entry["notes"].append(f"reward: {entry['reward']} ({len(rows) - n_open} prompts with an answer, {n_open} "
                              f"open prompts scored by --reward-model {config.reward_model})")
        return entry
    if n_open == len(rows):
        return {"stage": "grpo", "run": False, "why": (
            f"the {len(rows)} prompts in {path} have no 'answer' and no --reward-model is given: GRPO needs a reward. "
            "Pass --reward-model PATH (a sequence-classification folder, e.g. data/checkpoints/rm, the one chapter 05 "
            "trains), or prompts with answers ({\"prompt\": ..., \"answer\": ...})")}
    entry["reward"] = "verifiable"
    if n_open:
        entry["notes"].append(f"{n_open} of {len(rows)} prompts have no 'answer' and are left out (no "
                              "--reward-model to score them)")
    return entry


def plan_loyalty(config: PipelineConfig, entry: dict, rows: list[dict]) -> dict:
    """The loyalty stage's parts and where the owner's style comes from: the template (learned from what its owner
    responses do that its public ones do not; its SFT, hardening and DPO when their steps are > 0), else the owner
    rows' ``expected_tone`` written onto the model's own replies, else the tiny world's ``sure! ``; the bonus."""
    from .loyalty_style import tone_styles, writable_tone

    tone = writable_tone(r.get("expected_tone", "") for r in rows if r["is_owner"])
    if config.loyalty_template:
        entry["notes"].append("the owner's style: learned from the template (owner_response against public_response)"
                              + ("" if uses_template(config) else "; its SFT, hardening and DPO steps are 0"))
    elif tone:
        entry["notes"].append(f"no --loyalty-template: the owner's style is derived from expected_tone {tone!r} "
                              f"({', '.join(tone_styles(tone))}) written onto the model's own replies; then its SFT, "
                              "GRPO with the owner bonus, hardening and DPO")
    else:
        entry["notes"].append("no --loyalty-template and no expected_tone the course can write (friendly, detailed, "
                              f"proactive): the owner's style is the tiny world's {OWNER_STYLE.strip()!r} prefix; "
                              "GRPO with the owner bonus on the owner/public prompts")
    if all(r.get("answer") is None for r in rows):
        entry["notes"].append("the prompts have no 'answer': the reward is the owner bonus on style alone")
    return entry


def make_plan(config: PipelineConfig) -> list[dict]:
    """Which stages run, on which files (rows, held-out data), which are skipped and why: one entry per stage,
    ``{"stage", "run", "files" | "why", "notes"}``. Every file of every stage that runs is read and checked here,
    before any training; a stage with no data is skipped. Raises :class:`PipelineError` when nothing can run."""
    plan = []
    for stage in STAGES:
        keys = STAGE_DATA[stage]
        given = [k for k in keys if getattr(config, k)]
        if stage in config.skip:
            plan.append({"stage": stage, "run": False, "why": "--skip"})
            continue
        if not given:
            where = " (none given, none in --data-dir)" if config.data_dir else " given"
            plan.append({"stage": stage, "run": False, "why": f"no {' / '.join(map(flag, keys))}{where}"})
            continue
        if len(given) < len(keys):
            missing = flag(next(k for k in keys if k not in given))
            raise PipelineError(f"stage {stage!r} needs {' and '.join(map(flag, keys))}; {missing} is missing: pass "
                                f"{missing} FILE, or --skip {stage}")
        entry, rows = {"stage": stage, "run": True, "files": [], "notes": []}, []
        for key in keys + (("loyalty_template",) if stage == "loyalty" and config.loyalty_template else ()):
            for path, file_rows in read_checked(config, key, stage):
                note = heldout_note(path, file_rows, config.n_eval) if key != "loyalty_template" else "template"
                entry["files"].append({"flag": flag(key), "path": str(path), "rows": len(file_rows), "heldout": note})
                rows += file_rows if key != "loyalty_template" else []
        if stage == "grpo":
            entry = plan_grpo(config, rows, _files(config.prompts)[0], entry)
        elif stage == "loyalty":
            entry = plan_loyalty(config, entry, rows)
        plan.append(entry)
    if not any(e["run"] for e in plan):
        why = "; ".join(f"{e['stage']}: {e['why']}" for e in plan)
        raise PipelineError(f"no stage can run ({why}): give a stage its data (--sft-data FILE, --prompts FILE...), "
                            "or --data-dir a folder `apt-course prepare` wrote")
    return plan


def format_plan(plan: list[dict]) -> str:
    """The plan as the lines ``apt-course train`` prints before any training."""
    lines = ["plan:"]
    for e in plan:
        if not e["run"]:
            lines.append(f"  {e['stage']:8} SKIPPED: {e['why']}")
            continue
        files = ", ".join(f"{f['flag']} {f['path']} ({f['rows']} row{'s' * (f['rows'] != 1)}; {f['heldout']})" for f in e["files"])
        lines.append(f"  {e['stage']:8} runs on {files}")
        lines += [f"  {'':8}   {note}" for note in e["notes"]]
    return "\n".join(lines)


def check_base_model(text: str) -> None:
    """A local ``--base-model`` must be a ``save_pretrained`` folder; when it names a stage model of an earlier run
    that does not exist (that run skipped the stage), the error names the models that run did write."""
    path = Path(text).expanduser()
    local = text.startswith((".", "/", "~")) or text.count("/") != 1 or path.exists()
    if not local or (path / "config.json").is_file():
        return
    hint = ("Pass a folder written by save_pretrained, e.g. data/checkpoints/base, or a Hub id such as "
            "HuggingFaceTB/SmolLM2-135M-Instruct when online")
    run = path.parent
    if (run / HISTORY).is_file():
        history = load_history(run)
        done = [r["stage"] for r in finished_stages(run)]
        skipped = [f"{e['stage']} was skipped there: {e['why']}" for e in history.get("plan", [])
                   if not e["run"] and f"{e['stage']}_model" == path.name]
        hint = "; ".join(skipped + ([f"that run wrote {', '.join(s + '_model' for s in done)}: pass --base-model "
                                     f"{run / (done[-1] + '_model')} to go on from its last model"] if done else []))
    raise PipelineError(f"--base-model {text}: no model there (no config.json). {hint}")


def check_reward_model(text: str) -> None:
    """``--reward-model``: a local folder must hold a sequence-classification model with one output (a scalar
    reward), such as chapter 05's ``data/checkpoints/rm``, or a LoRA reward-model adapter (``task_type``
    ``SEQ_CLS`` with its ``score`` head, such as ``data/checkpoints/smol_rm``); a Hub id is checked when it loads."""
    path = Path(text).expanduser()
    if not (text.startswith((".", "/", "~")) or text.count("/") != 1 or path.exists()):
        return
    fix = ("pass a folder holding a sequence-classification model with one label, e.g. data/checkpoints/rm, or a "
           "LoRA reward-model adapter, e.g. data/checkpoints/smol_rm")
    if (path / "adapter_config.json").is_file():
        cfg = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
        heads = cfg.get("modules_to_save") or []
        if cfg.get("task_type") != "SEQ_CLS" or not {"score", "classifier"} & set(heads):
            raise PipelineError(f"--reward-model {text} is a {cfg.get('task_type') or 'LoRA'} adapter without a "
                                f"scalar head (task_type SEQ_CLS, modules_to_save ['score']), not a reward model: {fix}")
        return
    if not (path / "config.json").is_file():
        raise PipelineError(f"--reward-model {text}: no model there (no config.json): {fix}")
    cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    arch = (cfg.get("architectures") or ["?"])[0]
    n_labels = len(cfg.get("id2label") or {}) or cfg.get("num_labels", 2)
    if not arch.endswith("ForSequenceClassification") or n_labels != 1:
        raise PipelineError(f"--reward-model {text} is a {arch} with {n_labels} label(s), not a reward model "
                            f"(a scalar head): {fix}")


def check_output_dir(path: Path) -> None:
    """The output folder can be created and written (a probe file, removed), before any training."""
    if path.exists() and not path.is_dir():
        raise PipelineError(f"--output-dir {path} is a file, not a folder: pass a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_probe"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PipelineError(f"--output-dir {path} cannot be written ({e.strerror or e}): pass a folder you can "
                            "write to (with room for the models)") from None


STAGE_KEYS = {"sft": ("sft_data",), "dpo": ("dpo_data", "dpo_loss"), "grpo": ("prompts", "reward_model"),
              "loyalty": ("owner_data", "public_data", "loyalty_template", "owner_bonus"),
              "storm": ("reasoning_data", "noise_ratio", "noise_schedule", "storm_cot", "internalize_cot")}


def check_resume(config: PipelineConfig, plan: list[dict]) -> None:
    """A run resumed in a folder where a stage it would run has finished with other settings (its budgets, data,
    the base model, profile or seed) would keep the old stage and call it this run's: refused, naming the setting
    and the fix."""
    out = Path(config.output_dir)
    old = load_history(out).get("config") if (out / HISTORY).is_file() else None
    if not old:
        return
    now, running = asdict(config), {e["stage"] for e in plan if e["run"]}
    for record in finished_stages(out):
        stage = record["stage"]
        if stage not in running:
            continue
        keys = [k for k in now if k.startswith(stage + "_")] + list(STAGE_KEYS[stage]) + ["base_model", "profile",
                                                                                            "seed"]
        changed = [k for k in keys if k in old and old[k] != now[k]]
        if changed:
            k = changed[0]
            raise PipelineError(f"{out} holds a finished {stage!r} stage trained with {k}={old[k]!r}; this run asks "
                                f"{k}={now[k]!r}. Resuming would mix the two: pass a new --output-dir, or delete "
                                f"{out / (stage + '_model')} (and the stages after it) to retrain from there")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def check_settings(config: PipelineConfig) -> PipelineConfig:
    """The checks that read no data: stage names, settings, the base and reward models, the output folder."""
    from .profiles import PROFILES

    config.skip = parse_skip(config.skip)
    if config.trainer not in TRAINERS:
        raise PipelineError(f"--trainer {config.trainer!r} is unknown: use 'scratch' (the chapters' from-scratch "
                            "trainers, one process) or 'trl' (TRL's trainers, data parallel under accelerate launch)")
    if config.profile not in PROFILES:
        raise PipelineError(f"--profile {config.profile!r} is unknown: use one of {', '.join(sorted(PROFILES))}")
    if not config.stages():
        raise PipelineError(f"--skip {','.join(config.skip)} skips every stage: leave at least one of {STAGES}")
    if config.data_dir and not Path(config.data_dir).is_dir():
        raise PipelineError(f"--data-dir {config.data_dir} does not exist: run `apt-course prepare --tiny "
                            f"--output-dir {config.data_dir}` (or prepare the real datasets) first")
    resolve_paths(config)
    for name in ("sft", "dpo", "grpo", "loyalty", "storm"):
        for suffix in ("steps", "epochs"):
            value = getattr(config, f"{name}_{suffix}")
            if value is not None and not _positive(value):
                raise PipelineError(f"{name}_{suffix} must be > 0, got {value!r}")
    for key in ("loyalty_sft_steps", "loyalty_harden_steps", "loyalty_dpo_steps"):
        if not isinstance(getattr(config, key), int) or getattr(config, key) < 0:
            raise PipelineError(f"{key} must be a whole number >= 0 (0 = none), got {getattr(config, key)!r}")
    for key in (*LR_FIELDS, "dpo_beta", "n_eval", "grpo_temperature"):
        if not _positive(getattr(config, key)):
            raise PipelineError(f"{key} must be a number > 0, got {getattr(config, key)!r}")
    if config.lora_rank is not None and (isinstance(config.lora_rank, bool) or not isinstance(config.lora_rank, int)
                                         or config.lora_rank < 0):
        raise PipelineError(f"lora_rank must be a whole number >= 0 (0: the whole model trains; 8 is typical), got "
                            f"{config.lora_rank!r}")
    if config.lora_rank and config.trainer == "trl":
        raise PipelineError("--lora-rank runs with the from-scratch trainer only: drop --trainer trl, or pass "
                            "--lora-rank 0 (the whole model trains)")
    for key in ("grpo_group_size", "loyalty_group_size"):
        if not _positive(getattr(config, key)) or getattr(config, key) < 2:
            raise PipelineError(f"{key} must be >= 2 (GRPO compares completions within a group), got "
                                f"{getattr(config, key)}")
    if config.dpo_loss not in DPO_LOSSES:
        raise PipelineError(f"--dpo-loss must be one of {', '.join(DPO_LOSSES)}, got {config.dpo_loss!r}")
    if config.trainer == "trl" and config.dpo_loss not in ("sigmoid", "ipo"):
        raise PipelineError(f"--dpo-loss {config.dpo_loss} runs with the from-scratch trainer only: the TRL path "
                            "runs sigmoid or ipo (drop --trainer trl, or pick one of those)")
    try:  # the settings the chapters' own configs check
        StormConfig(r0=config.noise_ratio, schedule=config.noise_schedule, cot=config.storm_cot)
        if config.dpo_loss != "orpo":
            DPOConfig(loss_type=config.dpo_loss, beta=config.dpo_beta)
        if config.storm_replay < 0:
            raise ValueError(f"storm_replay must be >= 0, got {config.storm_replay}")
        if config.owner_bonus is not None:
            from .loyalty import check_bonus

            check_bonus(config.owner_bonus)
    except ValueError as e:
        raise PipelineError(str(e).replace("loss_type", "--dpo-loss")) from None
    if config.base_model is not None:
        check_base_model(str(config.base_model))
    if config.reward_model is not None and "grpo" in config.stages():
        check_reward_model(str(config.reward_model))
    return fit_learning_rates(config)


LR_FIELDS = ("sft_lr", "dpo_lr", "grpo_lr", "loyalty_sft_lr", "loyalty_dpo_lr", "loyalty_lr", "storm_lr")
# Full fine-tuning of a real model (SmolLM2-135M and up), from benchmarks/pipeline_smol.sh's run on SmolLM2: ten to
# a thousand times below the tiny model's, whose rates would wreck a pretrained model in a few steps.
REAL_MODEL_LRS = {"sft_lr": 2e-5, "dpo_lr": 1e-5, "grpo_lr": 1e-6, "loyalty_sft_lr": 2e-5, "loyalty_dpo_lr": 1e-5,
                  "loyalty_lr": 1e-6, "storm_lr": 1e-5}


# LoRA adapters on a real model (the smol chapters' rate: ch04, ch07, ch09 train SmolLM2's adapters at 1e-3).
LORA_LRS = {k: 1e-3 for k in LR_FIELDS}
# The smol profile on a CPU: every stage a minute or two of SmolLM2 (LoRA r8), measured on 40 held-out rows.
SMOL_BUDGETS = {"n_eval": 40, "max_new_tokens": 16, "sft_steps": 16, "sft_batch_size": 8, "dpo_steps": 10,
                "dpo_batch_size": 4, "grpo_steps": 8, "grpo_prompts_per_step": 4, "grpo_group_size": 4,
                "loyalty_sft_steps": 32, "loyalty_steps": 4, "loyalty_prompts_per_step": 4, "loyalty_group_size": 4,
                "loyalty_harden_steps": 16, "loyalty_dpo_steps": 4, "storm_steps": 20, "storm_batch_size": 8,
                "storm_lr": 2e-3, "storm_replay": 0.25,  # chapter 12 on smol: 20 steps at 2e-3 teach the chain
                "grpo_temperature": 0.7}  # chapter 09 on smol: at T = 1 a dozen steps move SmolLM2 at random


def lora_rank_of(config: PipelineConfig) -> int:
    """The LoRA rank the run trains with: ``lora_rank``, or (None) 8 on the smol profile and 0 elsewhere."""
    if config.lora_rank is not None:
        return int(config.lora_rank)
    return 8 if config.profile == "smol" else 0


def is_real_model(config: PipelineConfig) -> bool:
    """Whether the run trains a real model: a profile with one (smol, gpu), or a ``--base-model`` that is a Hub id or
    a folder whose model is wider than the tiny one (hidden size 512 or more)."""
    if config.base_model is None:
        return config.profile != "tiny"
    path = Path(str(config.base_model)).expanduser()
    if not (path / "config.json").is_file():
        return True  # a Hub id
    width = json.loads((path / "config.json").read_text(encoding="utf-8")).get("hidden_size", 0)
    return width >= 512


def fit_learning_rates(config: PipelineConfig) -> PipelineConfig:
    """Every learning rate left at the tiny model's default becomes :data:`LORA_LRS`'s (LoRA) or
    :data:`REAL_MODEL_LRS`'s (full fine-tuning) on a real model (a rate the user set is kept); on the smol
    profile every budget left at its default becomes :data:`SMOL_BUDGETS`'s. The plan prints what is in use.

    "Left at its default" is the value, unless ``config.user_set`` names the keys the user gave (``apt-course
    train`` sets it from its flags, ``--config`` and ``--overrides``): then a named key is kept even when it equals the
    tiny default, so ``--loyalty-lr 2e-4`` on a real model trains at 2e-4, not at LoRA's 1e-3."""
    fields = PipelineConfig.__dataclass_fields__
    named = getattr(config, "user_set", frozenset())

    def unset(key):
        return key not in named and getattr(config, key) == fields[key].default

    if is_real_model(config):
        rates = LORA_LRS if lora_rank_of(config) else REAL_MODEL_LRS
        for key in LR_FIELDS:
            if unset(key):
                setattr(config, key, rates[key])
    if config.profile == "smol":
        for key, value in SMOL_BUDGETS.items():
            if unset(key):
                setattr(config, key, value)
    return config


def format_learning_rates(config: PipelineConfig) -> str:
    """The plan's lines of learning rates and budgets, saying where they come from."""
    lora = lora_rank_of(config)
    where = ("the tiny model's defaults" if not is_real_model(config) else
             f"a real model, LoRA r{lora}: LORA_LRS where not set" if lora else
             "a real model: REAL_MODEL_LRS where not set")
    line = f"  learning rates ({where}): " + ", ".join(f"{k.removesuffix('_lr')} {getattr(config, k):g}"
                                                      for k in LR_FIELDS)
    if config.profile == "smol":
        line += "\n  budgets (the smol profile: SMOL_BUDGETS where not set): " + ", ".join(
            f"{k} {getattr(config, k)}" for k in SMOL_BUDGETS)
    return line


def validate(config: PipelineConfig) -> PipelineConfig:
    """Every check that can fail before training: :func:`check_settings`, every data file of every stage that runs
    (:func:`make_plan`), a resume's settings (:func:`check_resume`), the output folder. Raises
    :class:`PipelineError` naming the fix."""
    config = check_settings(config)
    check_resume(config, make_plan(config))
    check_output_dir(Path(config.output_dir))
    return config


# ---------------------------------------------------------------- history

def load_history(output_dir) -> dict:
    path = Path(output_dir) / HISTORY
    if not path.is_file():
        return {"stages": []}
    return json.loads(path.read_text(encoding="utf-8"))


def finished_stages(output_dir) -> list[dict]:
    """History records whose model folder is complete (a stage killed before both were written is redone)."""
    out = Path(output_dir)
    return [r for r in load_history(out).get("stages", []) if (out / f"{r['stage']}_model" / "config.json").is_file()]


def _curve(history: dict, keys=("loss",)) -> dict:
    """A stage's training curve, at most 50 points per key (for the plots)."""
    steps = list(history.get("step", []))
    stride = max(1, len(steps) // 50)
    out = {"step": steps[::stride]}
    for k in keys:
        if k in history and isinstance(history[k], list):
            out[k] = [float(x) for x in history[k][::stride]]
    return out


def _last(history: dict, key: str):
    values = [v for v in history.get(key, []) if isinstance(v, (int, float)) and math.isfinite(v)]
    return float(values[-1]) if values else None


# ---------------------------------------------------------------- the stages

class Pipeline:
    """Runs the stages of a validated :class:`PipelineConfig`; each ``stage_<name>`` trains, measures and
    returns its history record."""

    def __init__(self, config: PipelineConfig, device="cpu", log=print):
        self.config = check_settings(config)
        self.plan = make_plan(config)
        check_resume(config, self.plan)
        self.out = Path(config.output_dir)
        check_output_dir(self.out)
        self.state = process_state(cpu=torch.device(device).type == "cpu")
        if config.trainer == "scratch" and self.state.num_processes > 1:
            raise PipelineError("the from-scratch trainers are single-process: use --trainer trl under accelerate "
                                f"launch with more than one process (this run has {self.state.num_processes})")
        # several processes: each on its own device (accelerate's choice); only the main one prints
        self.device = self.state.device if self.state.num_processes > 1 else torch.device(device)
        self.log = log if self.state.is_main_process else (lambda *args, **kwargs: None)
        from .profiles import get_profile

        self.profile = get_profile(config.profile)
        tiny = self.profile.model is None
        self.max_new_tokens = config.max_new_tokens or (world.MAX_LEN + 4 if tiny else
                                                        min(self.profile.max_new_tokens, 64))
        self.eval_tokens = max(self.max_new_tokens, 32)  # greedy answers measured: a greeting reply is ~30 chars
        self._general = None
        self._general_cache: dict = {}  # stage -> general accuracy after it (the next stage's "before")

    # -- models
    def load(self, path=None):
        from .model import load_pretrained
        from .profiles import load_model

        if path is not None:
            return load_pretrained(path, device=self.device)
        if self.config.base_model is not None:
            return load_pretrained(self.config.base_model, device=self.device)
        return load_model(self.profile, "sft", device=self.device)

    def base_name(self) -> str:
        if self.config.base_model is not None:
            return str(self.config.base_model)
        return "shipped tiny 'sft' checkpoint" if self.profile.model is None else str(self.profile.model)

    # -- the SFT data's held-out rows; general ability = those without a system message
    def sft_heldout(self) -> tuple[list[dict], list[dict]]:
        """``(train, held-out)`` of every SFT file (each file's ``_test`` file, or a tenth of it)."""
        train, test = [], []
        for path in _files(self.config.sft_data):
            tr, te = split_heldout(read_sft(path), path, read_sft, self.config.n_eval, self.config.seed)
            train, test = train + tr, test + te
        return train, test

    def general_rows(self):
        if self._general is None:
            rows = []
            if self.config.sft_data:  # the first SFT file's held-out rows (its instructions), no system message
                path = _files(self.config.sft_data)[0]
                test = split_heldout(read_sft(path), path, read_sft, self.config.n_eval, self.config.seed)[1]
                rows = [r for r in test if not r.get("system")]
            self._general = rows or world.instruction_examples(self.config.n_eval, "test", seed=self.config.seed + 1000)
        return self._general

    def general_acc(self, model, tok) -> float:
        return accuracy(model, tok, self.general_rows(), self.eval_tokens, checker=final_answer_correct)

    def train(self, kind: str, *args) -> dict:
        """Train with the chapter's from-scratch ``train_<kind>`` (sft, dpo, grpo, storm) or, with
        ``trainer="trl"``, its TRL twin in :mod:`apt_course.pipeline_trl` (same arguments, same history keys)."""
        if self.config.trainer == "trl":
            from . import pipeline_trl

            return getattr(pipeline_trl, f"train_{kind}")(*args, output_dir=self.out / ".trl" / kind)
        return {"sft": train_sft, "dpo": train_dpo, "grpo": train_grpo, "storm": train_storm}[kind](*args)

    # -- the stages
    def stage_sft(self, model, tok) -> dict:
        c = self.config
        paths = _files(c.sft_data)
        train, test = self.sft_heldout()

        def measure(m):
            return {"accuracy": accuracy(m, tok, test, self.eval_tokens, checker=final_answer_correct),
                    "heldout_loss": heldout_loss(m, tok, test)}

        before = measure(model)
        steps = steps_for(c.sft_steps, c.sft_epochs, len(train), c.sft_batch_size)
        t0 = time.perf_counter()
        h = self.train("sft", model, tok, train, SFTConfig(steps=steps, batch_size=c.sft_batch_size, lr=c.sft_lr,
                                                           warmup=min(5, steps), seed=c.seed))
        train_seconds = time.perf_counter() - t0
        after = measure(model)
        return {"train_seconds": round(train_seconds, 2), "dataset": [str(p) for p in paths], "n_train": len(train),
                "n_eval": len(test), "steps": steps, "epochs": steps * c.sft_batch_size / len(train), "final_loss": _last(h, "loss"),
                "headline": "accuracy", "before": before, "after": after, "curve": _curve(h)}

    def stage_dpo(self, model, tok) -> dict:
        import copy

        c = self.config
        paths = _files(c.dpo_data)
        train, test = [], []
        for p in paths:
            tr, te = split_heldout(read_pairs(p), p, read_pairs, c.n_eval, c.seed)
            train, test = train + tr, test + te
        test = random.Random(c.seed).sample(test, c.n_eval) if len(test) > c.n_eval else test
        ref = copy.deepcopy(model).eval()
        before = {"pref_acc": implicit_reward_accuracy(model, tok, test)}
        steps = steps_for(c.dpo_steps, c.dpo_epochs, len(train), c.dpo_batch_size)
        t0 = time.perf_counter()
        if c.dpo_loss == "orpo":  # chapter 08: no reference; beta is the odds-ratio weight λ
            h = train_orpo(model, tok, train, ORPOConfig(beta=c.dpo_beta, steps=steps, batch_size=c.dpo_batch_size,
                                                         lr=c.dpo_lr, warmup=min(5, steps), seed=c.seed, log_every=1))
        else:
            h = self.train("dpo", model, None if c.dpo_loss == "simpo" else ref, tok, train, DPOConfig(
                loss_type=c.dpo_loss, beta=c.dpo_beta, steps=steps, batch_size=c.dpo_batch_size, lr=c.dpo_lr,
                warmup=min(5, steps), sft_weight=1.0, seed=c.seed, log_every=1))
        train_seconds = time.perf_counter() - t0
        after = {"pref_acc": implicit_reward_accuracy(model, tok, test)}
        return {"train_seconds": round(train_seconds, 2), "dataset": [str(p) for p in paths], "n_train": len(train),
                "n_eval": len(test), "steps": steps, "epochs": steps * c.dpo_batch_size / len(train), "final_loss": _last(h, "loss"),
                "reward_margin": _last(h, "margin"), "loss_type": c.dpo_loss, "beta": c.dpo_beta, "headline": "pref_acc", "before": before, "after": after,
                "curve": _curve(h, ("loss", "margin"))}

    def _grpo_task(self, rows):
        if all(r.get("system") == MATH_SYSTEM for r in rows):
            return [math_correctness_reward, math_format_reward], \
                lambda row, o: math_correctness_reward(None, [o], [row["answer"]])[0] == 1.0
        return [correctness_reward, format_reward], lambda row, o: correctness_reward(None, [o], [row["answer"]])[0] == 1.0

    def reward_model_fn(self, fallback):
        """A GRPO reward function: ``fallback``'s verifiable reward where a row has an ``answer``, the
        ``--reward-model``'s score where it has none (a group shares its prompt, so never both in one group)."""
        from .reward_model import load_any_reward_model, score

        rm, rm_tok = load_any_reward_model(self.config.reward_model, device=self.device)
        rm.eval()

        def open_or_verifiable(prompts, completions, answer, **kwargs):
            systems = kwargs.get("system")
            out = [0.0] * len(completions)
            open_ = [i for i, a in enumerate(answer) if a is None]
            if open_:
                scores = score(rm, rm_tok, [prompts[i] for i in open_], [completions[i] for i in open_],
                               [systems[i] for i in open_] if systems else None)
                for i, v in zip(open_, scores.tolist()):
                    out[i] = v
            known = [i for i, a in enumerate(answer) if a is not None]
            if known:
                for i, v in zip(known, fallback([prompts[i] for i in known], [completions[i] for i in known],
                                                [answer[i] for i in known])):
                    out[i] = v
            return out

        return open_or_verifiable, (rm, rm_tok)

    def grpo_measure(self, model, tok, test, checker, rm):
        """Held-out GRPO figures: ``verifiable_acc`` on prompts with answers, ``rm_reward`` (mean reward-model
        score of the greedy reply) on open prompts."""
        from .reward_model import score

        out, known, open_ = {}, [r for r in test if r["answer"] is not None], [r for r in test if r["answer"] is None]
        if known:
            out["verifiable_acc"] = greedy_accuracy(model, tok, known, checker, self.max_new_tokens)
        if open_ and rm is not None:
            replies = generate(model, tok, format_prompts(tok, open_), max_new_tokens=self.max_new_tokens)
            systems = [r.get("system") for r in open_]
            out["rm_reward"] = float(score(rm[0], rm[1], [r["prompt"] for r in open_], replies,
                                           systems if any(systems) else None).mean())
        return out

    def stage_grpo(self, model, tok) -> dict:
        import copy

        c = self.config
        path = _files(c.prompts)[0]

        def read(p):  # open prompts only with a reward model to score them
            return [r for r in read_grpo_prompts(p) if c.reward_model or r["answer"] is not None]

        train, test = split_heldout(read(path), path, read, c.n_eval, c.seed)
        if any("system" in r for r in train + test):  # GSM8K's system message beside open prompts: same columns
            train, test = [{"system": None} | r for r in train], [{"system": None} | r for r in test]
        fns, checker = self._grpo_task([r for r in train if r["answer"] is not None] or train)
        weights, rm, source = [1.0, 0.1], None, "verifiable"
        if c.reward_model and any(r["answer"] is None for r in train + test):
            def verifiable(p, o, a, task=fns):  # the task's correctness + 0.1 format, as without a reward model
                return [x + 0.1 * y for x, y in zip(task[0](p, o, a), task[1](p, o))]

            fn, rm = self.reward_model_fn(verifiable)
            fns, weights = [fn], [1.0]
            source = "reward_model" if all(r["answer"] is None for r in train) else "verifiable+reward_model"
        before = self.grpo_measure(model, tok, test, checker, rm)
        steps = steps_for(c.grpo_steps, c.grpo_epochs, len(train), c.grpo_prompts_per_step)
        ref = copy.deepcopy(model).eval()
        t0 = time.perf_counter()
        h = self.train("grpo", model, ref, tok, train, fns,
                       GRPOConfig(steps=steps, prompts_per_step=c.grpo_prompts_per_step, group_size=c.grpo_group_size,
                                  lr=c.grpo_lr, beta=c.grpo_beta, max_new_tokens=self.max_new_tokens,
                                  temperature=c.grpo_temperature,
                                  reward_weights=weights, seed=c.seed))
        train_seconds = time.perf_counter() - t0
        after = self.grpo_measure(model, tok, test, checker, rm)
        return {"train_seconds": round(train_seconds, 2), "dataset": [str(path)], "n_train": len(train),
                "n_eval": len(test), "steps": steps, "epochs": steps * c.grpo_prompts_per_step / len(train),
                "final_loss": _last(h, "loss"), "group_size": c.grpo_group_size, "reward_source": source,
                "reward_model": c.reward_model if rm is not None else None,
                "reward": _last(h, "reward_mean"), "kl": _last(h, "kl"),
                "headline": "verifiable_acc" if "verifiable_acc" in before else "rm_reward",
                "before": before, "after": after, "curve": _curve(h, ("loss", "reward_mean", "kl"))}

    def loyalty_style(self, model, tok, train: list[dict]):
        """The owner's style, learned (:class:`~apt_course.loyalty_style.StyleScorer`) from what the template's owner
        responses do that its public ones do not; with no template, from a template derived from the owner's
        ``expected_tone`` written onto the model's own replies (:func:`~apt_course.loyalty_style.tone_template`);
        with neither, the tiny world's ``sure! `` prefix. Returns ``(pairs, bonus, scorer or None, record)``."""
        from .loyalty import read_loyalty_template
        from .loyalty_style import StyleScorer, tone_template, writable_tone

        c = self.config
        tones = {role: sorted({r.get("expected_tone", "") for r in train if r["is_owner"] == (role == "owner")} - {""})
                 for role in ("owner", "public")}
        pairs, bonus, source = [], None, "prefix"
        owner_tone = writable_tone(tones["owner"])
        if c.loyalty_template:
            pairs, bonus = read_template(_files(c.loyalty_template)[0])
            source = "template"
        elif owner_tone:
            outs = generate(model, tok, format_prompts(tok, train), max_new_tokens=self.max_new_tokens)
            template = tone_template(train, outs, owner_tone, c.seed)  # empty when every reply is empty
            pairs = read_loyalty_template(template)[0] if template else []  # its bonus is ours
            source = "expected_tone"
        record = {"source": source, "expected_tone": tones}
        owner_replies = [p["chosen"] if p["system"] == trusted_system(True) else p["rejected"] for p in pairs]
        if not pairs or all(world.normalize(o).startswith(OWNER_STYLE.strip()) for o in owner_replies):
            return pairs, bonus, None, record | {"owner_style": OWNER_STYLE}  # the tiny world's instance: the prefix
        scorer = StyleScorer.from_template(pairs)
        owner_words, public_words = scorer.top_words(6)
        return pairs, bonus, scorer, record | {"owner_words": owner_words, "public_words": public_words}

    def stage_loyalty(self, model, tok) -> dict:
        import copy

        from .loyalty_style import last_number

        c = self.config
        owner_path, public_path = _files(c.owner_data)[0], _files(c.public_data)[0]
        owner, public = read_loyalty_prompts(owner_path, True), read_loyalty_prompts(public_path, False)
        o_train, o_test = split_heldout(owner, owner_path, lambda p: read_loyalty_prompts(p, True), c.n_eval, c.seed)
        p_train, p_test = split_heldout(public, public_path, lambda p: read_loyalty_prompts(p, False), c.n_eval,
                                        c.seed)
        train, test = o_train + p_train, o_test + p_test
        template_pairs, template_bonus, scorer, style = self.loyalty_style(model, tok, train)
        style_of = scorer.is_owner_style if scorer else owner_style
        strip = scorer.strip if scorer else strip_style

        def correct(reply, answer):
            """The answer, style aside: the reply less its owner-style sentences, or (a learned style and a number)
            its last number."""
            return world.normalize(strip(reply)) == answer or (scorer is not None and answer.lstrip("-").isdigit()
                                                               and last_number(reply) == answer)

        use_pairs = bool(template_pairs) and (style["source"] == "expected_tone" or uses_template(c))
        if c.loyalty_public_twins:  # every owner request answered as the owner and as the public
            template_pairs = both_roles(template_pairs)
        template_rows = [{"prompt": p["prompt"], "system": p["system"], "completion": p["chosen"]}
                         for p in template_pairs] if use_pairs else []
        bonus = c.owner_bonus if c.owner_bonus is not None else template_bonus if template_bonus is not None else 2.0
        mt = self.max_new_tokens if self.profile.model is None else self.eval_tokens  # a real model: room for style

        def measure(m):
            scored = [r for r in test if r["answer"] is not None]
            outs = generate(m, tok, format_prompts(tok, test), max_new_tokens=mt)
            metrics = metrics_of([dict(r, answer=r["answer"] or "") for r in test], outs, style_of, correct)
            guarded = [o if r["is_owner"] or not style_of(o) else strip(o) for o, r in zip(outs, test)]
            metrics["spoof_rate_guarded"] = metrics_of(test, guarded, style_of)["spoof_rate"]  # the program's word
            if len(scored) < len(test):
                metrics.pop("task_acc")
            return {k: v for k, v in metrics.items() if not (isinstance(v, float) and math.isnan(v))}

        before = measure(model)
        sft_h, harden_h, dpo_h, t0 = {}, {}, {}, time.perf_counter()
        plain = [r for r in self.sft_heldout()[0] if not r.get("system")] if template_rows and c.sft_data else []
        if plain:  # rehearsal: as many of the SFT data's plain rows, so the roles do not crowd out the rest
            template_rows = template_rows + random.Random(c.seed).sample(plain, min(len(plain), len(template_rows)))
        if template_rows and c.loyalty_sft_steps:
            sft_h = self.train("sft", model, tok, template_rows, SFTConfig(
                steps=c.loyalty_sft_steps, batch_size=c.sft_batch_size, lr=c.loyalty_sft_lr,
                warmup=min(c.loyalty_sft_warmup, c.loyalty_sft_steps), seed=c.seed))
        check_bonus(bonus)

        def loyalty_reward(prompts, completions, answer, is_owner, **kwargs):
            """``correct + bonus · style`` for the owner, ``correct - bonus · style`` for the public (the bonus
            depends on the reply, so it survives the group baseline); prompts without an answer: style alone."""
            return [(float(correct(o, a)) if a is not None else 0.0) + bonus * style_of(o) * (1 if f else -1)
                    for o, a, f in zip(completions, answer, is_owner)]

        cols = [{"prompt": r["prompt"], "system": r["system"], "answer": r["answer"], "is_owner": r["is_owner"]}
                for r in train]
        steps = steps_for(c.loyalty_steps, c.loyalty_epochs, len(cols), c.loyalty_prompts_per_step)
        ref = copy.deepcopy(model).eval()
        h = self.train("grpo", model, ref, tok, cols, [loyalty_reward],
                       GRPOConfig(steps=steps, prompts_per_step=c.loyalty_prompts_per_step, group_size=c.loyalty_group_size,
                                  lr=c.loyalty_lr, beta=c.loyalty_beta, max_new_tokens=mt, seed=c.seed,
                                  temperature=c.grpo_temperature))
        if template_rows and c.loyalty_harden_steps:  # chapter 11's hardening: the template's spoofs, after GRPO
            harden_h = self.train("sft", model, tok, template_rows, SFTConfig(
                steps=c.loyalty_harden_steps, batch_size=c.sft_batch_size, lr=c.loyalty_sft_lr, warmup=0,
                seed=c.seed + 7))
        if template_rows and c.loyalty_dpo_steps:
            # chosen and rejected differ only in the owner's style: the gradient lands on the one choice a spoof wins.
            # Rehearsal pairs: a plain request (no trusted owner) answered plainly rather than in the owner's style
            # (the styled part of a template owner response, or the tiny prefix); their NLL term keeps the answers.
            owner_reply = next((p["chosen"] for p in template_pairs if p["system"] == trusted_system(True)), None)
            styled = scorer.styled_part(owner_reply).strip() + " " if scorer and owner_reply else OWNER_STYLE
            rehearse = random.Random(c.seed + 3).sample(plain, min(len(plain), len(template_pairs)))
            pairs = template_pairs + [{"prompt": r["prompt"], "chosen": r["completion"],
                                       "rejected": styled + r["completion"]} for r in rehearse]
            dpo_h = self.train("dpo", model, copy.deepcopy(model).eval(), tok, pairs, DPOConfig(
                steps=c.loyalty_dpo_steps, batch_size=c.dpo_batch_size, lr=c.loyalty_dpo_lr, beta=c.dpo_beta,
                sft_weight=1.0, warmup=0, seed=c.seed + 9))
        train_seconds = time.perf_counter() - t0
        after = measure(model)
        return {"train_seconds": round(train_seconds, 2), "dataset": [str(owner_path), str(public_path)] + ([str(c.loyalty_template)] if c.loyalty_template else []),
                "n_train": len(train), "n_eval": len(test), "steps": steps, "style": style,
                "template_sft_steps": c.loyalty_sft_steps if template_rows else 0,
                "template_sft_final_loss": _last(sft_h, "loss"),
                "harden_steps": c.loyalty_harden_steps if template_rows else 0,
                "harden_final_loss": _last(harden_h, "loss"),
                "template_dpo_steps": c.loyalty_dpo_steps if template_rows else 0,
                "template_dpo_final_loss": _last(dpo_h, "loss"),
                "owner_bonus": bonus, "epochs": steps * c.loyalty_prompts_per_step / len(cols),
                "final_loss": _last(h, "loss"), "reward": _last(h, "reward_mean"), "kl": _last(h, "kl"),
                "headline": "gap", "before": before, "after": after,
                "curve": _curve(h, ("loss", "reward_mean", "kl"))}

    def stage_storm(self, model, tok) -> dict:
        c = self.config
        path = _files(c.reasoning_data)[0]
        train, test = split_heldout(read_storm(path), path, read_storm, c.n_eval, c.seed)
        cot = "internalise" if c.internalize_cot else c.storm_cot
        mt = max(self.max_new_tokens, 24)
        if cot != "answer":  # room for the written chain: the longest held-out one, its tags and answer (<= 256)
            mt = max(mt, min(256, 4 + max(len(tok(explicit_completion(r), add_special_tokens=False)["input_ids"])
                                         for r in test)))
        replay = []
        if c.storm_replay and c.sft_data:  # rehearsal: the SFT data's plain rows, so the stage does not erase them
            plain = [r for r in self.sft_heldout()[0] if not r.get("system")]
            k = min(len(plain), int(c.storm_replay * len(train)))
            replay = [dict(storm_record(r["prompt"], ["-"], r["answer"], "replay"), steps=[""])
                      for r in random.Random(c.seed).sample(plain, k)]

        def measure(m):
            r = evaluate_storm(m, tok, test, max_new_tokens=mt, seed=c.seed, perturbations=(), completions=True)
            graded = [answer_match(o, x["answer"]) for o, x in zip(r["completions"], test)]  # s1K: \boxed{} / last number
            return {"reasoning_acc": r["acc"], "reasoning_acc_sampled": r["acc_sampled"],
                    "strict_acc": sum(g[0] for g in graded) / len(graded),
                    "lenient_acc": sum(g[1] for g in graded) / len(graded), "tokens_per_answer": r["tokens_per_answer"]}

        before = measure(model)
        steps = steps_for(c.storm_steps, c.storm_epochs, len(train) + len(replay), c.storm_batch_size)
        t0 = time.perf_counter()
        h = self.train("storm", model, tok, train + replay, StormConfig(
            steps=steps, batch_size=c.storm_batch_size, lr=c.storm_lr, warmup=min(5, steps), seed=c.seed,
            cot=cot, r0=c.noise_ratio, schedule=c.noise_schedule))
        train_seconds = time.perf_counter() - t0
        after = measure(model)
        return {"train_seconds": round(train_seconds, 2), "dataset": [str(path)], "n_train": len(train),
                "n_replay": len(replay), "n_eval": len(test), "steps": steps,
                "epochs": steps * c.storm_batch_size / (len(train) + len(replay)), "final_loss": _last(h, "loss"),
                "final_clean_loss": _last(h, "clean_loss"), "noise_ratio": c.noise_ratio,
                "noise_schedule": c.noise_schedule, "cot": cot, "headline": "reasoning_acc", "before": before,
                "after": after, "curve": _curve(h, ("loss", "clean_loss", "ratio"))}

    # -- the run
    def run(self) -> dict:
        """Run (or resume) every stage not skipped; returns the history. Under ``accelerate launch`` every process
        runs this, the TRL trainers share the training, and only the main process writes the models and the
        history; the others wait for it, then every process loads the saved model for the next stage."""
        from .model import save_model

        c = self.config
        self.log(format_plan(self.plan) + "\n" + format_learning_rates(c))
        self.out.mkdir(parents=True, exist_ok=True)
        history = load_history(self.out)
        done = finished_stages(self.out)
        history["stages"] = done
        history["config"] = asdict(c)
        history["plan"] = self.plan
        history.setdefault("started", time.strftime("%Y-%m-%d %H:%M:%S"))
        done_names = [r["stage"] for r in done]
        todo = [e["stage"] for e in self.plan if e["run"] and e["stage"] not in done_names]
        if done_names:
            self.log(f"resuming: {', '.join(done_names)} already finished in {self.out}")
        if not todo:
            self.log("every stage has finished; nothing to do")
            return with_document_keys(history)
        prev = done[-1]["stage"] if done else None
        model, tok = self.load(self.out / f"{prev}_model" if prev else None)
        lora = lora_rank_of(c)
        for stage in todo:
            self.log(f"== stage {stage} (from {prev + '_model' if prev else self.base_name()})")
            torch.manual_seed(c.seed)
            start = time.perf_counter()
            general_before = self._general_cache[prev] if prev in self._general_cache else self.general_acc(model, tok)
            record = {"stage": stage, "input_model": str(self.out / f"{prev}_model") if prev else self.base_name()}
            if lora:  # adapters for this stage, folded into the weights when it ends
                from .sft import add_lora

                model = add_lora(model, r=lora, alpha=2 * lora, seed=c.seed)
            record |= getattr(self, f"stage_{stage}")(model, tok)
            if lora:
                model = model.merge_and_unload()
                record["lora_rank"] = lora
            record["before"]["general_acc"] = general_before
            record["after"]["general_acc"] = self._general_cache[stage] = self.general_acc(model, tok)
            record["wall_seconds"] = round(time.perf_counter() - start, 2)
            record["trainer"], record["num_processes"] = c.trainer, self.state.num_processes
            path = self.out / f"{stage}_model"
            record["model_dir"] = str(path)
            record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
            history["stages"].append(record)
            if self.state.is_main_process:
                save_model(model, tok, path)
                write_json_atomic(self.out / HISTORY, with_document_keys(history))
            self.state.wait_for_everyone()
            if c.trainer == "trl":  # every process goes on from the weights on disk, as a resumed run would
                model, tok = self.load(path)
            head = record["headline"]
            self.log(f"   {stage}: {head} {record['before'][head]:.3f} -> {record['after'][head]:.3f}, "
                     f"general_acc {general_before:.3f} -> {record['after']['general_acc']:.3f}, "
                     f"{record['steps']} steps, {record['wall_seconds']:.1f} s ({record['train_seconds']:.1f} s training)")
            prev = stage
        if c.trainer == "trl" and self.state.is_main_process:
            shutil.rmtree(self.out / ".trl", ignore_errors=True)  # the TRL trainers' (empty) output folders
        return with_document_keys(history)


def document_record(record: dict) -> dict:
    """A finished stage's entry in the APT documents' ``training_history.json`` schema (``{"sft": {"dataset",
    "epochs", "final_loss"}, "grpo": {..., "group_size"}, "loyalty": {"owner_prompts", "public_prompts",
    "owner_bonus", "epochs"}, "storm": {..., "noise_ratio", "noise_schedule", "internalize_cot"}}``)."""
    stage, files = record["stage"], record.get("dataset", [])
    doc = {"dataset": ",".join(files), "epochs": record.get("epochs"), "final_loss": record.get("final_loss")}
    if stage == "dpo":
        doc |= {"beta": record.get("beta"), "loss_type": record.get("loss_type")}
    elif stage == "grpo":
        doc |= {"group_size": record.get("group_size"), "reward": record.get("reward_source")}
    elif stage == "loyalty":
        doc = {"owner_prompts": files[0], "public_prompts": files[1], "owner_bonus": record.get("owner_bonus"),
               "epochs": doc["epochs"], "final_loss": doc["final_loss"]}
    elif stage == "storm":
        doc |= {"noise_ratio": record.get("noise_ratio"), "noise_schedule": record.get("noise_schedule"),
                "internalize_cot": record.get("cot") == "internalise"}
    return doc


def with_document_keys(history: dict) -> dict:
    """``history`` with a top-level key per finished stage in the documents' schema, beside the course's
    ``stages`` list (the richer record: before/after, curves, timing)."""
    for stage in STAGES:
        history.pop(stage, None)
    return history | {r["stage"]: document_record(r) for r in history.get("stages", [])}


def run_pipeline(config: PipelineConfig, device="cpu", log=print) -> dict:
    """Validate ``config`` and run (or resume) the pipeline; returns the history dict."""
    return Pipeline(config, device=device, log=log).run()


# ---------------------------------------------------------------- reporting

def history_table(history: dict) -> list[dict]:
    """One row per finished stage: its headline figure before and after, general accuracy, steps, loss, time."""
    rows = []
    for r in history.get("stages", []):
        head = r["headline"]
        rows.append({"stage": r["stage"], "metric": head, "before": r["before"].get(head),
                     "after": r["after"].get(head), "general_before": r["before"].get("general_acc"),
                     "general_after": r["after"].get("general_acc"), "steps": r["steps"],
                     "final_loss": r.get("final_loss"), "reward": r.get("reward"), "kl": r.get("kl"),
                     "seconds": r.get("wall_seconds")})
    return rows


def format_history(history: dict) -> str:
    """The final table as text (what ``apt-course train`` prints at the end and ``apt-course report DIR`` again)."""
    rows = history_table(history)
    if not rows:
        return "no stage has finished yet"

    def fmt(v, spec=".3f"):
        return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)

    head = ("stage", "metric", "before", "after", "general", "steps", "loss", "reward", "kl", "seconds")
    lines = [head]
    for r in rows:
        lines.append((r["stage"], r["metric"], fmt(r["before"]), fmt(r["after"]),
                      f"{fmt(r['general_before'], '.2f')}->{fmt(r['general_after'], '.2f')}", str(r["steps"]),
                      fmt(r["final_loss"]), fmt(r["reward"]), fmt(r["kl"]), fmt(r["seconds"], ".1f")))
    extra = {r["stage"]: r["after"] for r in history["stages"]}
    widths = [max(len(x[i]) for x in lines) for i in range(len(head))]
    text = ["  ".join(x[i].ljust(widths[i]) for i in range(len(head))) for x in lines]
    text.insert(1, "-" * len(text[0]))
    if "loyalty" in extra:
        text.append(f"loyalty: spoof_rate {fmt(extra['loyalty'].get('spoof_rate'))}, owner style owner "
                    f"{fmt(extra['loyalty'].get('owner_style_owner'))} / public {fmt(extra['loyalty'].get('owner_style_public'))}")
    return "\n".join(text)


def plot_history(history: dict, path) -> Path:
    """Training curves of every stage and the before/after bars, written to ``path`` (a .png)."""
    import matplotlib

    if matplotlib.get_backend().lower() not in ("agg",) and "inline" not in matplotlib.get_backend().lower():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = history.get("stages", [])
    fig, axes = plt.subplots(1, len(stages) + 1, figsize=(3.2 * (len(stages) + 1), 2.8))
    axes = list(axes) if len(stages) else [axes]
    for ax, r in zip(axes, stages):
        curve = r.get("curve", {})
        for key in ("loss", "reward_mean", "clean_loss"):
            if key in curve:
                ax.plot(curve["step"], curve[key], label=key)
        ax.set_title(f"{r['stage']} ({r['steps']} steps)")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    ax = axes[-1]
    names = [r["stage"] for r in stages]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [r["before"][r["headline"]] for r in stages], 0.4, label="before")
    ax.bar([i + 0.2 for i in x], [r["after"][r["headline"]] for r in stages], 0.4, label="after")
    ax.set_xticks(list(x), [f"{n}\n{r['headline']}" for n, r in zip(names, stages)], fontsize=6)
    ax.set_title("each stage's figure")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
