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
from .loyalty import OWNER_STYLE, fixed_loyalty_reward, loyalty_metrics, strip_style
from .rewards import correctness_reward, format_reward, math_correctness_reward, math_format_reward
from .sft import SFTConfig, heldout_loss, train_sft
from .storm import StormConfig, evaluate_storm, train_storm
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
    ceil(epochs · rows / batch)); batch sizes, learning rates. DPO's ``dpo_beta``; GRPO's prompts per step,
    group size, ``grpo_beta``; loyalty: ``loyalty_sft_steps`` of SFT on the template (the role's response under
    the trusted system message), then ``loyalty_steps`` of GRPO with ``owner_bonus`` (None: the template's
    ``reward_bonus``), ``loyalty_beta``, then ``loyalty_harden_steps`` more of the template SFT (chapter 11's
    hardening: the template's spoof attempts, answered as the trusted channel says; 0 = none), then
    ``loyalty_dpo_steps`` of DPO with the NLL term (``loyalty_dpo_lr``, ``dpo_beta``, ``dpo_batch_size``) on the template's pairs,
    whose two responses differ only in the owner's style (the gradient lands on the one choice a spoof wins), with
    as many of the SFT data's plain rows as rehearsal pairs (the plain answer over the same in owner style); storm: ``noise_ratio`` r0, ``noise_schedule``, ``storm_cot`` (what the
    storm stage trains: ``"answer"`` the answer alone, ``"explicit"`` the written chain, ``"internalise"``),
    ``internalize_cot`` (= ``storm_cot="internalise"``, stepwise internalisation), ``storm_replay``: rehearsal rows
    from the SFT data per reasoning row (the tiny model forgets its other skills in a few dozen storm steps
    without them; 0 = none). ``n_eval``: held-out rows per measurement.

    ``trainer``: ``"scratch"`` (default) trains every stage with the chapters' from-scratch loops, in one process;
    ``"trl"`` with TRL's trainers (:mod:`apt_course.pipeline_trl`: SFTTrainer, DPOTrainer, GRPOTrainer, a storm
    SFTTrainer), which run data parallel under ``accelerate launch`` (several GPUs, DeepSpeed ZeRO, FSDP); a batch
    size is then the global batch, split over the processes.
    """

    output_dir: str = "runs/apt_pipeline"
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
    grpo_steps: int = 24
    grpo_epochs: float | None = None
    grpo_prompts_per_step: int = 8
    grpo_group_size: int = 8
    grpo_lr: float = 3e-4
    grpo_beta: float = 0.0
    loyalty_sft_steps: int = 24
    loyalty_sft_lr: float = 1e-3
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
    storm_cot: str = "answer"
    internalize_cot: bool = False
    storm_replay: float = 1.0
    trainer: str = "scratch"

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
    if len(rows) < 2:
        raise ValueError(f"{path} has {len(rows)} row(s): need at least 2 (one to train on, one held out)")
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
    instruction format ``instruction``/``input``/``output`` too, ``input`` joined after a blank line) ->
    ``{"prompt", "completion", "answer"}`` (``answer`` = the response, what exact-match accuracy compares)."""
    out = []
    for i, r in enumerate(read_records(path, "SFT")):
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


def read_loyalty_prompts(path, want_owner: bool) -> list[dict]:
    """The seed's owner/public prompt files -> loyalty rows (trusted system message from ``is_owner``, user text
    escaped); an ``answer`` field is kept for the task reward, a ``spoofed`` flag for the spoof rate."""
    data = read_json(path, "prompt", '{"prompts": [...]}')
    from .loyalty import read_prompt_file

    rows = read_prompt_file(data)
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
    """Whether the loyalty stage reads the template (its SFT, hardening or DPO steps)."""
    return bool(config.loyalty_sft_steps or config.loyalty_harden_steps or config.loyalty_dpo_steps)


def resolve_paths(config: PipelineConfig) -> PipelineConfig:
    """Fill every data path left None from ``config.data_dir`` (when the prepared file is there)."""
    if config.data_dir:
        for key, names in DATA_FILES.items():
            found = [str(Path(config.data_dir) / n) for n in names.split(",") if (Path(config.data_dir) / n).is_file()]
            if getattr(config, key) is None and found:
                setattr(config, key, ",".join(found))
    return config


def validate(config: PipelineConfig) -> PipelineConfig:
    """Every check that can fail before training: stage names, settings, the base model, each running stage's data
    (present and readable in its format). Raises :class:`PipelineError` naming the fix."""
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
            if value is not None and not value > 0:
                raise PipelineError(f"{name}_{suffix} must be > 0, got {value!r}")
    for key in ("loyalty_sft_steps", "loyalty_harden_steps", "loyalty_dpo_steps"):
        if not isinstance(getattr(config, key), int) or getattr(config, key) < 0:
            raise PipelineError(f"{key} must be a whole number >= 0 (0 = none), got {getattr(config, key)!r}")
    for key in ("sft_lr", "loyalty_sft_lr", "loyalty_dpo_lr", "dpo_lr", "grpo_lr", "loyalty_lr", "storm_lr", "dpo_beta", "n_eval"):
        if not getattr(config, key) > 0:
            raise PipelineError(f"{key} must be > 0, got {getattr(config, key)!r}")
    for key in ("grpo_group_size", "loyalty_group_size"):
        if getattr(config, key) < 2:
            raise PipelineError(f"{key} must be >= 2 (GRPO compares completions within a group), got "
                                f"{getattr(config, key)}")
    try:  # the settings the chapters' own configs check
        StormConfig(r0=config.noise_ratio, schedule=config.noise_schedule, cot=config.storm_cot)
        if config.storm_replay < 0:
            raise ValueError(f"storm_replay must be >= 0, got {config.storm_replay}")
        if config.owner_bonus is not None:
            from .loyalty import check_bonus

            check_bonus(config.owner_bonus)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    if config.base_model is not None:
        text = str(config.base_model)
        local = text.startswith((".", "/", "~")) or text.count("/") != 1 or Path(text).expanduser().exists()
        if local and not (Path(text).expanduser() / "config.json").is_file():
            raise PipelineError(f"--base-model {text}: no model there (no config.json). Pass a folder written by "
                                "save_pretrained, e.g. data/checkpoints/base, or a Hub id such as "
                                "HuggingFaceTB/SmolLM2-135M-Instruct when online")
    readers = {"sft_data": read_sft, "dpo_data": read_pairs, "prompts": load_prompts,
               "owner_data": lambda p: read_loyalty_prompts(p, True),
               "public_data": lambda p: read_loyalty_prompts(p, False), "reasoning_data": read_storm,
               "loyalty_template": read_template}
    for stage in config.stages():
        needed = STAGE_DATA[stage] + (("loyalty_template",) if stage == "loyalty" and uses_template(config) else ())
        for key in needed:
            flag = "--" + key.replace("_", "-")
            value = getattr(config, key)
            if value is None:
                raise PipelineError(f"stage {stage!r} needs {flag} (none given and none found in --data-dir): run "
                                    f"`apt-course prepare --tiny` for the tiny world, or pass {flag} FILE, or "
                                    f"--skip {stage}")
            for path in _files(value):
                if not path.is_file():
                    raise PipelineError(f"{flag} {path} does not exist (stage {stage!r}); run `apt-course prepare` "
                                        f"or fix the path, or --skip {stage}")
                try:
                    readers[key](path)
                except (ValueError, KeyError, TypeError) as e:
                    raise PipelineError(f"{flag} {path}: {e}") from None
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
        self.config = validate(config)
        self.out = Path(config.output_dir)
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
        h = self.train("dpo", model, ref, tok, train, DPOConfig(
            beta=c.dpo_beta, steps=steps, batch_size=c.dpo_batch_size, lr=c.dpo_lr, warmup=min(5, steps),
            sft_weight=1.0, seed=c.seed, log_every=1))
        train_seconds = time.perf_counter() - t0
        after = {"pref_acc": implicit_reward_accuracy(model, tok, test)}
        return {"train_seconds": round(train_seconds, 2), "dataset": [str(p) for p in paths], "n_train": len(train),
                "n_eval": len(test), "steps": steps, "epochs": steps * c.dpo_batch_size / len(train), "final_loss": _last(h, "loss"),
                "reward_margin": _last(h, "margin"), "headline": "pref_acc", "before": before, "after": after,
                "curve": _curve(h, ("loss", "margin"))}

    def _grpo_task(self, rows):
        if all(r.get("system") == MATH_SYSTEM for r in rows):
            return [math_correctness_reward, math_format_reward], \
                lambda row, o: math_correctness_reward(None, [o], [row["answer"]])[0] == 1.0
        return [correctness_reward, format_reward], lambda row, o: correctness_reward(None, [o], [row["answer"]])[0] == 1.0

    def stage_grpo(self, model, tok) -> dict:
        import copy

        c = self.config
        path = _files(c.prompts)[0]
        rows = [r for r in load_prompts(path) if r.get("answer") is not None]
        if not rows:
            raise PipelineError(f"--prompts {path}: GRPO needs an 'answer' per prompt (a verifiable reward)")
        rows = [{k: r[k] for k in ("prompt", "answer", "system") if k in r} for r in rows]
        train, test = split_heldout(rows, path, load_prompts, c.n_eval, c.seed)
        test = [t for t in test if t.get("answer") is not None]
        fns, checker = self._grpo_task(train)
        before = {"verifiable_acc": greedy_accuracy(model, tok, test, checker, self.max_new_tokens)}
        steps = steps_for(c.grpo_steps, c.grpo_epochs, len(train), c.grpo_prompts_per_step)
        ref = copy.deepcopy(model).eval()
        t0 = time.perf_counter()
        h = self.train("grpo", model, ref, tok, train, fns,
                       GRPOConfig(steps=steps, prompts_per_step=c.grpo_prompts_per_step, group_size=c.grpo_group_size,
                                  lr=c.grpo_lr, beta=c.grpo_beta, max_new_tokens=self.max_new_tokens,
                                  reward_weights=[1.0, 0.1], seed=c.seed))
        train_seconds = time.perf_counter() - t0
        after = {"verifiable_acc": greedy_accuracy(model, tok, test, checker, self.max_new_tokens)}
        return {"train_seconds": round(train_seconds, 2), "dataset": [str(path)], "n_train": len(train), "n_eval": len(test), "steps": steps,
                "epochs": steps * c.grpo_prompts_per_step / len(train), "final_loss": _last(h, "loss"),
                "reward": _last(h, "reward_mean"), "kl": _last(h, "kl"), "headline": "verifiable_acc",
                "before": before, "after": after, "curve": _curve(h, ("loss", "reward_mean", "kl"))}

    def stage_loyalty(self, model, tok) -> dict:
        import copy

        c = self.config
        owner_path, public_path = _files(c.owner_data)[0], _files(c.public_data)[0]
        owner, public = read_loyalty_prompts(owner_path, True), read_loyalty_prompts(public_path, False)
        o_train, o_test = split_heldout(owner, owner_path, lambda p: read_loyalty_prompts(p, True), c.n_eval, c.seed)
        p_train, p_test = split_heldout(public, public_path, lambda p: read_loyalty_prompts(p, False), c.n_eval,
                                        c.seed)
        train, test = o_train + p_train, o_test + p_test
        bonus, template_pairs, template_rows = c.owner_bonus, [], []
        if c.loyalty_template and uses_template(c):
            template_pairs, template_bonus = read_template(_files(c.loyalty_template)[0])
            template_rows = [{"prompt": p["prompt"], "system": p["system"], "completion": p["chosen"]}
                             for p in template_pairs]
            bonus = template_bonus if bonus is None else bonus
        bonus = 2.0 if bonus is None else bonus
        mt = self.max_new_tokens

        def measure(m):
            scored = [r for r in test if r["answer"] is not None]
            metrics = loyalty_metrics(m, tok, [dict(r, answer=r["answer"] or "") for r in test], mt)
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
                steps=c.loyalty_sft_steps, batch_size=c.sft_batch_size, lr=c.loyalty_sft_lr, warmup=0, seed=c.seed))
        fixed = fixed_loyalty_reward(bonus)

        def loyalty_reward(prompts, completions, answer, is_owner, **kwargs):
            """The fixed (response-dependent) bonus; prompts without an answer are scored on style alone."""
            scored = fixed(prompts, completions, [a or "" for a in answer], is_owner)
            return [s - float(a is None and strip_style(o) == "") for s, a, o in zip(scored, answer, completions)]

        cols = [{"prompt": r["prompt"], "system": r["system"], "answer": r["answer"], "is_owner": r["is_owner"]}
                for r in train]
        steps = steps_for(c.loyalty_steps, c.loyalty_epochs, len(cols), c.loyalty_prompts_per_step)
        ref = copy.deepcopy(model).eval()
        h = self.train("grpo", model, ref, tok, cols, [loyalty_reward],
                       GRPOConfig(steps=steps, prompts_per_step=c.loyalty_prompts_per_step, group_size=c.loyalty_group_size,
                                  lr=c.loyalty_lr, beta=c.loyalty_beta, max_new_tokens=mt, seed=c.seed))
        if template_rows and c.loyalty_harden_steps:  # chapter 11's hardening: the template's spoofs, after GRPO
            harden_h = self.train("sft", model, tok, template_rows, SFTConfig(
                steps=c.loyalty_harden_steps, batch_size=c.sft_batch_size, lr=c.loyalty_sft_lr, warmup=0,
                seed=c.seed + 7))
        if template_pairs and c.loyalty_dpo_steps:
            # chosen and rejected differ only in the owner's style: the gradient lands on the one choice a spoof wins.
            # Rehearsal pairs: a plain request (no trusted owner) answered plainly rather than in the owner's style;
            # their NLL term keeps the answers.
            rehearse = random.Random(c.seed + 3).sample(plain, min(len(plain), len(template_pairs)))
            pairs = template_pairs + [{"prompt": r["prompt"], "chosen": r["completion"],
                                       "rejected": OWNER_STYLE + r["completion"]} for r in rehearse]
            dpo_h = self.train("dpo", model, copy.deepcopy(model).eval(), tok, pairs, DPOConfig(
                steps=c.loyalty_dpo_steps, batch_size=c.dpo_batch_size, lr=c.loyalty_dpo_lr, beta=c.dpo_beta,
                sft_weight=1.0, warmup=0, seed=c.seed + 9))
        train_seconds = time.perf_counter() - t0
        after = measure(model)
        return {"train_seconds": round(train_seconds, 2), "dataset": [str(owner_path), str(public_path)] + ([str(c.loyalty_template)] if template_rows else []),
                "n_train": len(train), "n_eval": len(test), "steps": steps, "template_sft_steps":
                c.loyalty_sft_steps if template_rows else 0, "template_sft_final_loss": _last(sft_h, "loss"),
                "harden_steps": c.loyalty_harden_steps if template_rows else 0,
                "harden_final_loss": _last(harden_h, "loss"),
                "template_dpo_steps": c.loyalty_dpo_steps if template_pairs else 0,
                "template_dpo_final_loss": _last(dpo_h, "loss"),
                "owner_bonus": bonus, "epochs": steps * c.loyalty_prompts_per_step / len(cols),
                "final_loss": _last(h, "loss"), "reward": _last(h, "reward_mean"), "kl": _last(h, "kl"),
                "headline": "gap", "before": before, "after": after,
                "curve": _curve(h, ("loss", "reward_mean", "kl"))}

    def stage_storm(self, model, tok) -> dict:
        c = self.config
        path = _files(c.reasoning_data)[0]
        train, test = split_heldout(read_storm(path), path, read_storm, c.n_eval, c.seed)
        mt = max(self.max_new_tokens, 24)
        cot = "internalise" if c.internalize_cot else c.storm_cot
        replay = []
        if c.storm_replay and c.sft_data:  # rehearsal: the SFT data's plain rows, so the stage does not erase them
            plain = [r for r in self.sft_heldout()[0] if not r.get("system")]
            k = min(len(plain), int(c.storm_replay * len(train)))
            replay = [dict(storm_record(r["prompt"], ["-"], r["answer"], "replay"), steps=[""])
                      for r in random.Random(c.seed).sample(plain, k)]

        def measure(m):
            r = evaluate_storm(m, tok, test, max_new_tokens=mt, seed=c.seed, perturbations=())
            return {"reasoning_acc": r["acc"], "reasoning_acc_sampled": r["acc_sampled"],
                    "tokens_per_answer": r["tokens_per_answer"]}

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
        self.out.mkdir(parents=True, exist_ok=True)
        history = load_history(self.out)
        done = finished_stages(self.out)
        history["stages"] = done
        history["config"] = asdict(c)
        history.setdefault("started", time.strftime("%Y-%m-%d %H:%M:%S"))
        done_names = [r["stage"] for r in done]
        todo = [s for s in c.stages() if s not in done_names]
        if done_names:
            self.log(f"resuming: {', '.join(done_names)} already finished in {self.out}")
        if not todo:
            self.log("every stage has finished; nothing to do")
            return history
        prev = done[-1]["stage"] if done else None
        model, tok = self.load(self.out / f"{prev}_model" if prev else None)
        for stage in todo:
            self.log(f"== stage {stage} (from {prev + '_model' if prev else self.base_name()})")
            torch.manual_seed(c.seed)
            start = time.perf_counter()
            general_before = self._general_cache[prev] if prev in self._general_cache else self.general_acc(model, tok)
            record = {"stage": stage, "input_model": str(self.out / f"{prev}_model") if prev else self.base_name()}
            record |= getattr(self, f"stage_{stage}")(model, tok)
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
                write_json_atomic(self.out / HISTORY, history)
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
        return history


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
