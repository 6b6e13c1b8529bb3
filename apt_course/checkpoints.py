"""The tiny checkpoints later chapters start from, shipped in ``data/checkpoints/``.

``base``: the tiny Llama pretrained on tiny-world prose (chapter 00's recipe, run longer).
``sft``:  ``base`` fine-tuned on tiny-world instructions plus greetings answered politely only a fifth of the
          time (chapter 04's recipe; the rudeness is the headroom chapters 06-07 remove).
``rm``:   a reward model (``LlamaForSequenceClassification``, one scalar head) started from ``sft`` and trained
          on tiny-world preference pairs with the Bradley–Terry loss (chapter 05's recipe).
Each folder holds ``model.safetensors``, ``config.json`` and the tokenizer, and loads with
``from_pretrained``. ``python -m apt_course build-checkpoints`` rebuilds them deterministically; when
the folder is missing (a pip install without the data), :func:`checkpoint_path` builds it into
``~/.cache/apt_course`` on first use.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .utils import repo_root

NAMES = ("base", "sft", "rm")

BASE_RECIPE = {"seed": 0, "corpus_size": 20000, "steps": 1500, "batch_size": 64, "seq_len": 64, "lr": 3e-3}
SFT_RECIPE = {"seed": 0, "train_size": 8000, "greetings": 1500, "steps": 800, "batch_size": 64, "lr": 2e-3}
RM_RECIPE = {"seed": 0, "train_size": 4000, "steps": 300, "batch_size": 32, "lr": 1e-3}


def checkpoints_dir() -> Path:
    if os.environ.get("APT_COURSE_CHECKPOINTS"):
        return Path(os.environ["APT_COURSE_CHECKPOINTS"])
    root = repo_root()
    if root is not None:
        return root / "data" / "checkpoints"
    return Path.home() / ".cache" / "apt_course" / "checkpoints"


def checkpoint_path(name: str, build_if_missing: bool = True) -> Path:
    """The folder of checkpoint ``name`` ("base", "sft" or "rm"), built first if it is missing."""
    if name not in NAMES:
        raise ValueError(f"unknown checkpoint {name!r}; the course ships {NAMES}")
    path = checkpoints_dir() / name
    if not (path / "model.safetensors").exists():
        if not build_if_missing:
            raise FileNotFoundError(f"checkpoint {path} is missing: run `python -m apt_course build-checkpoints`")
        print(f"checkpoint {name!r} not found at {path}; building it (a few minutes on a CPU, once)")
        build(name, path.parent)
    return path


def load_checkpoint(name: str, device: torch.device | str = "cpu"):
    """``(model, tokenizer)`` of a shipped checkpoint, through ``from_pretrained`` (``rm``: the reward model,
    loaded with ``AutoModelForSequenceClassification``)."""
    from .model import load_pretrained

    if name == "rm":
        from .reward_model import load_reward_model

        return load_reward_model(checkpoint_path(name), device=device)
    return load_pretrained(checkpoint_path(name), device=device)


def build(name: str, out: Path) -> Path:
    """Rebuild one checkpoint from its recipe (deterministic on a given machine and torch version)."""
    from . import world
    from .model import make_tiny_model, save_model
    from .pretrain import PretrainConfig, pretrain
    from .sft import SFTConfig, train_sft
    from .tokenizer import build_tokenizer

    start = time.perf_counter()
    if name == "base":
        r = BASE_RECIPE
        tokenizer = build_tokenizer()
        model = make_tiny_model(tokenizer, seed=r["seed"])
        texts = world.pretraining_corpus(r["corpus_size"], seed=r["seed"])
        cfg = PretrainConfig(steps=r["steps"], batch_size=r["batch_size"], seq_len=r["seq_len"], lr=r["lr"],
                             seed=r["seed"])
        history = pretrain(model, tokenizer, texts, cfg)
    elif name == "sft":
        r = SFT_RECIPE
        model, tokenizer = load_checkpoint("base")
        torch.manual_seed(r["seed"])
        data = world.instruction_examples(r["train_size"], "train", seed=r["seed"])
        data += world.greeting_dialogues(r["greetings"], "train", seed=r["seed"])
        cfg = SFTConfig(steps=r["steps"], batch_size=r["batch_size"], lr=r["lr"], seed=r["seed"])
        history = train_sft(model, tokenizer, data, cfg)
    elif name == "rm":
        from .reward_model import RewardConfig, load_reward_model, train_reward_model

        r = RM_RECIPE
        torch.manual_seed(r["seed"])  # the new scalar head's initialisation
        model, tokenizer = load_reward_model(checkpoint_path("sft"))
        pairs = world.preference_pairs(r["train_size"], "train", seed=r["seed"])
        cfg = RewardConfig(steps=r["steps"], batch_size=r["batch_size"], lr=r["lr"], seed=r["seed"])
        history = train_reward_model(model, tokenizer, pairs, cfg)
    else:
        raise ValueError(f"unknown checkpoint {name!r}; the course ships {NAMES}")
    path = save_model(model, tokenizer, Path(out) / name)
    info = {"name": name, "recipe": r, "final_loss": history["loss"][-1],
            "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    (path / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"built {name} in {info['seconds']} s -> {path}")
    return path


def build_all(names: list[str] | None = None, out: str | Path | None = None) -> None:
    out = Path(out) if out else checkpoints_dir()
    for name in names or NAMES:
        build(name, out)
