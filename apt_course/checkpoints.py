"""The tiny checkpoints later chapters start from, shipped in ``data/checkpoints/``.

``base``: the tiny Llama pretrained on tiny-world prose (chapter 00's recipe, run longer).
``sft``:  ``base`` fine-tuned on tiny-world instructions plus greetings answered politely only a fifth of the
          time (chapter 04's recipe; the rudeness is the headroom chapters 06-07 remove).
``rm``:   a reward model (``LlamaForSequenceClassification``, one scalar head) started from ``sft`` and trained
          on tiny-world preference pairs with the Bradley–Terry loss (chapter 05's recipe).
``cai``:  ``sft`` taught chapter 10's critique, revision and judge formats, obeying red-team requests (the
          helpful-only start that Constitutional AI makes harmless).
``cot``:  ``sft`` fine-tuned on the explicit chain of thought of 2- and 3-digit sums
          (``<think>8+1=9;7+1=8;4+1=5</think>589``): a model that can reason on paper, where chapter 12's
          internalisation and storm experiments start.
Each folder holds ``model.safetensors``, ``config.json`` and the tokenizer, and loads with
``from_pretrained``. Their recipes - which chapters' trainers ran, on what data, for how long - are in
:mod:`apt_course.recipes`; ``python -m apt_course build-checkpoints`` rebuilds them deterministically (into
``~/.cache/apt_course/checkpoints`` for a pip install without the data). This module is plumbing: it finds
and loads checkpoints and imports no chapter.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .utils import repo_root

NAMES = ("base", "sft", "rm", "cai", "cot", "loyal")  # cai: chapter 10's helpful-only assistant that critiques,
# revises, judges; cot: chapter 12's start, which writes the column-by-column chain of thought of 2- and 3-digit
# sums; loyal: chapter 11's channel trained offline on generated user text



def checkpoints_dir() -> Path:
    if os.environ.get("APT_COURSE_CHECKPOINTS"):
        return Path(os.environ["APT_COURSE_CHECKPOINTS"])
    root = repo_root()
    if root is not None:
        return root / "data" / "checkpoints"
    return Path.home() / ".cache" / "apt_course" / "checkpoints"


def checkpoint_path(name: str) -> Path:
    """The folder of shipped checkpoint ``name`` (one of :data:`NAMES`)."""
    if name not in NAMES:
        raise ValueError(f"unknown checkpoint {name!r}; the course ships {NAMES}")
    path = checkpoints_dir() / name
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"checkpoint {path} is missing (a pip install without the course's data/ folder?): "
                                "run `python -m apt_course build-checkpoints` to rebuild it (about 28 minutes on a "
                                "CPU), or set APT_COURSE_CHECKPOINTS to a folder that holds it")
    return path


def load_checkpoint(name: str, device: torch.device | str = "cpu"):
    """``(model, tokenizer)`` of a shipped checkpoint, through ``from_pretrained`` (``rm``: the reward model,
    loaded with ``AutoModelForSequenceClassification``)."""
    from .model import load_pretrained, load_reward_model

    if name == "rm":
        return load_reward_model(checkpoint_path(name), device=device)
    return load_pretrained(checkpoint_path(name), device=device)


def require_adapter(path: Path, what: str, build: str, minutes: int, folder: str) -> Path:
    """``path`` when it holds a PEFT adapter (``adapter_config.json``); else a FileNotFoundError that says how to
    build ``what`` (``build``, about ``minutes`` on a CPU, from the converted SmolLM2) or where else it may lie."""
    if not (path / "adapter_config.json").exists():
        raise FileNotFoundError(f"{what} is missing: no adapter_config.json in {path}. Build it with `{build}` (about "
                                f"{minutes} minutes on a CPU; it needs the converted SmolLM2, `python -m apt_course "
                                f"prepare-model`), or set APT_COURSE_CHECKPOINTS to a folder that holds {folder}/")
    return path
