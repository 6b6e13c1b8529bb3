"""Profiles: ``tiny`` (CPU, offline, the tiny world) or ``gpu`` (a real small model and real data, Colab).

A notebook's parameters cell sets ``PROFILE``; :func:`get_profile` turns it into a :class:`Profile`,
and :func:`load_model` loads the model for a stage through the same ``from_pretrained`` calls in both
cases: a local checkpoint folder for ``tiny``, a Hub id for ``gpu``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .model import load_pretrained


@dataclass(frozen=True)
class Profile:
    """name; model: Hub id or local folder (None = the tiny checkpoints); datasets: role -> Hub id;
    reward_model: a trained reward model (Hub id or folder) for online RLHF (chapter 06; None = the tiny RM);
    scale: multiplier a chapter may apply to its step budgets; max_new_tokens for generation."""

    name: str
    description: str
    model: str | None = None
    datasets: dict[str, str] = field(default_factory=dict)
    reward_model: str | None = None
    scale: float = 1.0
    max_new_tokens: int = 16


PROFILES = {
    "tiny": Profile("tiny", "CPU, offline: the tiny world and the course's own 0.9M-parameter Llama"),
    "gpu": Profile(
        "gpu",
        "Colab GPU (a free T4 is enough): a real small instruct model and real datasets from the Hub",
        model="HuggingFaceTB/SmolLM2-135M-Instruct",
        datasets={
            "sft": "m-a-p/COIG-CQIA",                          # Chinese instructions (the APT docs' choice)
            "sft_en": "HuggingFaceTB/smoltalk",                # English alternative
            "preference": "Anthropic/hh-rlhf",
            "preference_ultrafeedback": "HuggingFaceH4/ultrafeedback_binarized",
            "math": "openai/gsm8k",
            "reasoning": "simplescaling/s1K",
        },
        # a 0.6B Bradley-Terry RM (Qwen3, sequence classification); chapter 06 can use chapter 05's instead
        reward_model="Skywork/Skywork-Reward-V2-Qwen3-0.6B",
        scale=1.0,
        max_new_tokens=256,
    ),
}


def get_profile(name: str, **overrides) -> Profile:
    """The profile called ``name`` ("tiny" or "gpu"), with any field overridden (e.g. ``model=...``)."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: use one of {sorted(PROFILES)} "
                         "(set PROFILE in the notebook's first cell)")
    profile = PROFILES[name]
    unknown = set(overrides) - set(Profile.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown profile fields {sorted(unknown)}; fields are {sorted(Profile.__dataclass_fields__)}")
    return replace(profile, **overrides) if overrides else profile


def load_model(profile: Profile | str, stage: str = "sft", device: torch.device | str = "cpu",
               dtype: torch.dtype | None = None):
    """``(model, tokenizer)`` for a profile: the tiny checkpoint ``stage`` ("base"/"sft"), or the
    profile's model (which is already instruction-tuned, so ``stage`` does not change it)."""
    if isinstance(profile, str):
        profile = get_profile(profile)
    if profile.model is None:
        from .checkpoints import checkpoint_path

        return load_pretrained(checkpoint_path(stage), device=device, dtype=dtype)
    return load_pretrained(profile.model, device=device, dtype=dtype)
