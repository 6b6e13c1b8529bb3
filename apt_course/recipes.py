"""The recipes of the shipped tiny checkpoints, and the code that rebuilds them from the chapters' trainers.

``base``: chapter 00's pretraining, run longer; ``sft``: chapter 04's SFT on tiny-world instructions plus
greetings answered politely only a fifth of the time (the rudeness is the headroom chapters 06-07 remove);
``rm``: chapter 05's Bradley–Terry reward model started from ``sft``; ``cai``: chapter 10's helpful-only
assistant; ``cot``: ``sft`` taught the explicit chain of thought of 2- and 3-digit sums (:data:`COT_RECIPE`;
its ``recipe.json`` holds its held-out accuracy); ``loyal``: chapter 11's channel trained offline on generated
user text (:data:`LOYAL_RECIPE`; its ``recipe.json`` holds what it measured at seed 0). ``python -m apt_course build-checkpoints``
runs :func:`build_all` (about 28 minutes on a quiet 2-core CPU; `cot` 4 of them, `loyal` 8); each folder gets a ``recipe.json`` of what ran.

``smol_rm`` (built only when named: ``python -m apt_course build-checkpoints --only smol_rm``, or
``python -m apt_course.recipes smol_rm``; about 10 minutes on one CPU thread, and it needs the converted SmolLM2):
chapter 05's reward model of the real SmolLM2-135M-Instruct, LoRA adapters and a scalar head trained on English
sums (``reward_model.smol_reward_pairs``: right first, then short); only the adapter and the head are saved (a few
MB), and ``reward_model.load_smol_reward_model`` puts them back on SmolLM2. Chapter 06 on ``smol`` starts from it.

``smol_loyal`` (built only when named, the same way; about 6 minutes on one CPU thread): chapter 11's channel on
SmolLM2, a LoRA adapter taught the owner's style where the trusted system message says owner and the plain reply
everywhere else, spoof attempts with the training claims included (:data:`SMOL_LOYAL_RECIPE`,
``loyalty_style.train_channel``); ``loyalty_style.load_smol_loyal`` merges it into SmolLM2. Chapter 11 on ``smol``
starts from it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .checkpoints import NAMES, checkpoint_path, checkpoints_dir, load_checkpoint

BASE_RECIPE = {"seed": 0, "corpus_size": 20000, "steps": 1500, "batch_size": 64, "seq_len": 64, "lr": 3e-3}
SFT_RECIPE = {"seed": 0, "train_size": 8000, "greetings": 1500, "steps": 800, "batch_size": 64, "lr": 2e-3}
RM_RECIPE = {"seed": 0, "train_size": 4000, "steps": 300, "batch_size": 32, "lr": 1e-3}
CAI_RECIPE = {"seed": 0, "mixture_size": 10500, "steps": 800, "batch_size": 32, "lr": 1e-3}  # chapter 10
# chapters 09 and 12: sft taught to reason on paper, the column-by-column chain of thought of 2- and 3-digit sums
COT_RECIPE = {"seed": 0, "train_size": 20000, "three_digit_share": 0.75, "steps": 700, "batch_size": 64,
              "lr": 3e-3, "warmup": 50}
# chapter 05 on smol: SmolLM2 + LoRA (attention, rank 8) + a scalar head, on every kind of smol_reward_pairs
SMOL_RM_RECIPE = {"seed": 0, "steps": 240, "batch_size": 8, "lr": 1e-3, "warmup": 10, "lora_rank": 8,
                  "ramble": 0.25, "instruction": 0.5}
# chapter 11 on smol: SmolLM2 + LoRA taught the owner's style behind the trusted channel (loyalty_style.train_channel)
SMOL_LOYAL_RECIPE = {"seed": 0, "rows": 960, "spoof_fraction": 0.5, "steps": 80, "batch_size": 8, "lr": 3e-3,
                     "warmup": 10, "lora_rank": 8}
# chapter 11's channel trained offline: sft + SFT on owner/public requests whose user text is generated noise
# (loyalty_noise.noisy_channel_rows), every one answered as its trusted system message says
LOYAL_RECIPE = {"seed": 0, "rows": 20000, "plain_fraction": 0.5, "noise_owner": 0.5, "noise_public": 0.7,
                "claims_fraction": 0.2, "steps": 1000, "batch_size": 32, "lr": 5e-4, "warmup": 20}
SMOL_NAMES = ("smol_rm", "smol_loyal")  # built only when named (they need the converted SmolLM2)


def build(name: str, out: Path) -> Path:
    """Rebuild one checkpoint from its recipe (deterministic on a given machine and torch version)."""
    from . import world
    from .model import make_tiny_model, save_model
    from .pretrain import PretrainConfig, pretrain
    from .sft import SFTConfig, train_sft
    from .tokenizer import build_tokenizer

    start = time.perf_counter()
    if name == "smol_rm":
        return build_smol_rm(out)
    if name == "smol_loyal":
        return build_smol_loyal(out)
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
        from .model import load_reward_model
        from .reward_model import RewardConfig, train_reward_model

        r = RM_RECIPE
        torch.manual_seed(r["seed"])  # the new scalar head's initialisation
        model, tokenizer = load_reward_model(checkpoint_path("sft"))
        pairs = world.preference_pairs(r["train_size"], "train", seed=r["seed"])
        cfg = RewardConfig(steps=r["steps"], batch_size=r["batch_size"], lr=r["lr"], seed=r["seed"])
        history = train_reward_model(model, tokenizer, pairs, cfg)
    elif name == "cai":  # sft + constitution.format_mixture: helpful-only, and it can critique, revise, judge
        from .constitution import train_formats

        r = CAI_RECIPE
        model, tokenizer = load_checkpoint("sft")
        torch.manual_seed(r["seed"])
        history = train_formats(model, tokenizer, n=r["mixture_size"], seed=r["seed"], steps=r["steps"],
                                batch_size=r["batch_size"], lr=r["lr"])
    elif name == "cot":  # sft + explicit chain of thought on 2- and 3-digit sums (chapter 12's start)
        r = COT_RECIPE
        model, tokenizer, history = train_cot_model(r)
    elif name == "loyal":  # sft + the channel on generated user text (chapter 11's offline channel)
        r = LOYAL_RECIPE
        model, tokenizer, history = train_loyal_model(r)
    else:
        raise ValueError(f"unknown checkpoint {name!r}; the course ships {NAMES + SMOL_NAMES}")
    path = save_model(model, tokenizer, Path(out) / name)
    info = {"name": name, "recipe": r, "final_loss": history["loss"][-1],
            "seconds": round(time.perf_counter() - start, 1), "torch": torch.__version__}
    if name == "cot":
        info["heldout_explicit_acc"] = cot_heldout_accuracy(model, tokenizer)
    if name == "loyal":
        from .loyalty_noise import measure

        m = measure(model, tokenizer, seed=0)
        info["measured_at_seed_0"] = {"gap": m["gap"], "spoof_rate": m["spoof_rate"], "acc": m["acc"],
                                      "heldout_family": m["heldout"]["all"], "fresh_family": m["fresh"]["all"]}
    (path / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"built {name} in {info['seconds']} s -> {path}")
    return path


def cot_records(recipe: dict, split: str = "train") -> list[dict]:
    """The ``cot`` checkpoint's training records: ``train_size`` tiny-world sums, ``three_digit_share`` of them
    with three digits, the rest with two, shuffled."""
    import random

    from .data import world_to_storm
    from .world import cot_problems

    n3 = round(recipe["train_size"] * recipe["three_digit_share"])
    records = world_to_storm(cot_problems(n3, split, seed=recipe["seed"], digits=3)
                             + cot_problems(recipe["train_size"] - n3, split, seed=recipe["seed"], digits=2))
    random.Random(recipe["seed"]).shuffle(records)
    return records


def train_cot_model(recipe: dict | None = None):
    """``sft`` fine-tuned on the explicit chain of thought (:data:`COT_RECIPE`): ``(model, tokenizer, history)``."""
    from .storm import StormConfig, train_storm

    r = dict(COT_RECIPE, **(recipe or {}))
    model, tokenizer = load_checkpoint("sft")
    history = train_storm(model, tokenizer, cot_records(r),
                          StormConfig(steps=r["steps"], batch_size=r["batch_size"], lr=r["lr"], warmup=r["warmup"],
                                      seed=r["seed"], cot="explicit", log_every=50))
    return model, tokenizer, history


def train_loyal_model(recipe: dict | None = None):
    """``sft`` fine-tuned on :func:`~apt_course.loyalty_noise.noisy_channel_rows` (:data:`LOYAL_RECIPE`):
    ``(model, tokenizer, history)``."""
    from .loyalty_noise import noisy_channel_rows
    from .sft import SFTConfig, train_sft
    from .utils import set_seed

    r = dict(LOYAL_RECIPE, **(recipe or {}))
    set_seed(r["seed"])
    model, tokenizer = load_checkpoint("sft")
    rows = noisy_channel_rows(r["rows"], r["seed"], r["plain_fraction"], r["noise_owner"], r["noise_public"],
                              r["claims_fraction"])
    history = train_sft(model, tokenizer, rows, SFTConfig(steps=r["steps"], batch_size=r["batch_size"], lr=r["lr"],
                                                          warmup=r["warmup"], seed=r["seed"]))
    return model, tokenizer, history


def cot_heldout_accuracy(model, tokenizer, n: int = 150, seed: int = 1000) -> dict:
    """Greedy answer accuracy of a chain-of-thought model on ``n`` held-out 2-digit and 3-digit sums."""
    from .data import world_to_storm
    from .storm import evaluate_storm
    from .world import heldout_sums

    return {f"{d}_digit": round(evaluate_storm(model, tokenizer, world_to_storm(heldout_sums(n, seed=seed, digits=d)),
                                               max_new_tokens=40, perturbations=())["acc"], 3) for d in (2, 3)}


def build_smol_rm(out: Path, recipe: dict | None = None) -> Path:
    """Train the smol reward model (:data:`SMOL_RM_RECIPE`, or ``recipe``) and save its adapter and head to
    ``out/smol_rm``, with ``recipe.json`` (what ran, the final loss, held-out accuracy per kind of pair)."""
    from .reward_model import (
        RewardConfig,
        accuracy_by_kind,
        new_smol_reward_model,
        reward_margins,
        save_smol_reward_model,
        smol_reward_pairs,
        train_reward_model,
    )

    r = dict(SMOL_RM_RECIPE, **(recipe or {}))
    start = time.perf_counter()
    rm, tokenizer = new_smol_reward_model(seed=r["seed"], lora_rank=r["lora_rank"])
    pairs = smol_reward_pairs("train", seed=r["seed"], ramble=r["ramble"], instruction=r["instruction"])
    cfg = RewardConfig(steps=r["steps"], batch_size=r["batch_size"], lr=r["lr"], warmup=r["warmup"], seed=r["seed"])
    history = train_reward_model(rm, tokenizer, pairs, cfg)
    seconds = round(time.perf_counter() - start, 1)
    test = smol_reward_pairs("test", seed=1000 + r["seed"], ramble=r["ramble"], instruction=r["instruction"])
    accuracy = {k: round(v, 3) for k, v in accuracy_by_kind(reward_margins(rm, tokenizer, test), test).items()}
    info = {"name": "smol_rm", "recipe": r, "final_loss": history["loss"][-1], "seconds": seconds,
            "heldout_pairs": len(test), "heldout_accuracy": accuracy, "torch": torch.__version__}
    path = save_smol_reward_model(rm, Path(out) / "smol_rm", info)
    print(f"built smol_rm in {seconds} s (held-out accuracy {accuracy}) -> {path}")
    return path


def build_smol_loyal(out: Path, recipe: dict | None = None) -> Path:
    """Train chapter 11's channel adapter on SmolLM2 (:data:`SMOL_LOYAL_RECIPE`, or ``recipe``;
    :func:`~apt_course.loyalty_style.train_channel`) and save the adapter to ``out/smol_loyal`` with ``recipe.json``
    (what ran, the final loss, and the figures on held-out requests and the held-out attack family at seed 1000)."""
    from . import loyalty_style as S
    from .profiles import SMOL_HUB_ID, get_profile, load_model

    r = dict(SMOL_LOYAL_RECIPE, **(recipe or {}))
    start = time.perf_counter()
    model, tokenizer = load_model(get_profile("smol"))
    model, history = S.train_channel(model, tokenizer, r, r["seed"])
    seconds = round(time.perf_counter() - start, 1)
    test = S.english_requests(96, "test", 1000, spoof_fraction=0.5)
    scorer = S.StyleScorer.from_template(S.english_template(S.english_requests(120, "train", 1000, 0.5), 1000))
    m = S.measure(model, tokenizer, test, scorer, held=S.heldout_rows(5, 1000))
    figures = {k: round(m[k], 3) for k in ("owner_style_owner", "owner_style_public", "gap", "spoof_rate", "task_acc")}
    info = {"name": "smol_loyal", "recipe": r, "final_loss": history["loss"][-1], "seconds": seconds,
            "heldout_requests": len(test), "heldout": figures, "heldout_family_spoof_rate": m["heldout"]["all"],
            "torch": torch.__version__}
    path = Path(out) / "smol_loyal"
    model.peft_config["default"].base_model_name_or_path = SMOL_HUB_ID  # not this machine's path
    model.save_pretrained(str(path))
    (path / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
    (path / "recipe.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"built smol_loyal in {seconds} s ({figures}, held-out family {m['heldout']['all']}) -> {path}")
    return path


def build_all(names: list[str] | None = None, out: str | Path | None = None) -> None:
    out = Path(out) if out else checkpoints_dir()
    for name in names or NAMES:
        build(name, out)


if __name__ == "__main__":  # python -m apt_course.recipes [NAME ...] (default: the tiny checkpoints)
    import sys

    from .utils import set_cpu_threads

    set_cpu_threads()
    build_all(sys.argv[1:] or None)
