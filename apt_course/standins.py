"""Local stand-ins for a profile's Hub names: run the ``gpu`` profile's code path offline, in minutes.

``python -m apt_course stand-ins DIR`` writes

- ``DIR/model``: a small random Llama (two layers, width 64) with **SmolLM2's tokenizer and ChatML chat
  template** (taken from the converted SmolLM2 folder, see :mod:`apt_course.real_model`), saved with
  ``save_pretrained``: everything the real model's code path touches (template, vocabulary, special tokens,
  ``from_pretrained`` by path), at a thousandth of the cost;
- ``DIR/reward_model``: the same, as a one-label sequence classifier (the shape of a Bradley–Terry RM);
- ``DIR/data/<role>.jsonl``: each dataset role of the ``gpu`` profile as a file in the real dataset's schema
  (the samples in ``tests/fixtures/``, repeated to ``rows`` rows);
- ``DIR/env.sh``: the environment variables that point the profile at them (see :mod:`apt_course.profiles`),
  plus ``APT_COURSE_PROFILE_OVERRIDES`` with a small ``scale`` (each chapter multiplies its real-model step
  budgets by it) and short generations.

``source DIR/env.sh && python -m apt_course run --profile gpu`` then executes every notebook's real-model
branch: the check CI runs (``tests/test_profiles_run.py``) so that a notebook that would break on Colab
breaks here first. A teacher with a local mirror sets the same variables to real folders instead.
A random model learns nothing in a few steps, so these runs prove the code path, not the results: the
floors of a real-model run are asserted only at the full budget (``profile.scale >= 1``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from .utils import repo_root

# role of the gpu profile -> (fixture in tests/fixtures, the real dataset it stands in for)
DATASET_FIXTURES = {
    "sft": "coig_cqia_sample.jsonl",
    "preference": "hh_rlhf_sample.jsonl",
    "preference_ultrafeedback": "ultrafeedback_binarized_sample.jsonl",
    "math": "gsm8k_sample.jsonl",
    "reasoning": "s1k_sample.jsonl",
    "red_team": "hh_red_team_attempts_sample.jsonl",
    "red_team_test": "cai_conversation_harmless_sample.jsonl",
    "benign": "hh_rlhf_sample.jsonl",
}
SMOKE_OVERRIDES = {"scale": 0.02, "max_new_tokens": 8}


def fixtures_dir() -> Path:
    root = repo_root()
    if root is None or not (root / "tests" / "fixtures").is_dir():
        raise FileNotFoundError("the stand-in datasets come from tests/fixtures/ of the course repository: run this "
                                "from a clone (`pip install -e .` inside it)")
    return root / "tests" / "fixtures"


def small_llama(tokenizer, seed: int = 0, classifier: bool = False, hidden: int = 64, layers: int = 2):
    """A random Llama of width ``hidden`` over ``tokenizer``'s vocabulary (a causal LM, or a one-label
    sequence classifier with the tokenizer's pad id, as ``RewardTrainer`` and our RM code expect)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=False, pad_token_id=pad,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         num_labels=1)
    return (LlamaForSequenceClassification if classifier else LlamaForCausalLM)(config)


def repeat_rows(src: Path, dst: Path, rows: int) -> None:
    """``rows`` lines of the JSONL file ``src``, cycled, written to ``dst``."""
    lines = [line for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    dst.write_text("\n".join(lines[i % len(lines)] for i in range(rows)) + "\n", encoding="utf-8")


def environment(out: Path, overrides: dict | None = None) -> dict[str, str]:
    """The variables that point the ``gpu`` profile at the stand-ins in ``out``."""
    env = {"APT_COURSE_MODEL": str(out / "model"), "APT_COURSE_REWARD_MODEL": str(out / "reward_model")}
    env.update({f"APT_COURSE_DATASET_{role.upper()}": str(out / "data" / f"{role}.jsonl") for role in DATASET_FIXTURES})
    env["APT_COURSE_PROFILE_OVERRIDES"] = json.dumps({"gpu": {**SMOKE_OVERRIDES, **(overrides or {})}})
    return env


def make_stand_ins(out: str | Path, rows: int = 32, tokenizer_from: str | Path | None = None,
                   seed: int = 0) -> dict[str, str]:
    """Write the stand-ins into ``out`` (replacing it as a whole, atomically) and return :func:`environment`.
    ``tokenizer_from``: a folder with a chat-model tokenizer (default: the converted SmolLM2, built if missing)."""
    from transformers import AutoTokenizer

    from .real_model import smol_model_path

    out = Path(out).expanduser().resolve()
    source = Path(tokenizer_from) if tokenizer_from else smol_model_path(build_if_missing=True)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    if not tokenizer.chat_template:
        raise ValueError(f"{source}: its tokenizer has no chat template; the stand-in must exercise the real "
                         "model's template (use the converted SmolLM2: python -m apt_course prepare-model)")
    fixtures = fixtures_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for name, classifier in (("model", False), ("reward_model", True)):
            small_llama(tokenizer, seed=seed, classifier=classifier).save_pretrained(tmp / name)
            tokenizer.save_pretrained(tmp / name)
        (tmp / "data").mkdir()
        for role, fixture in DATASET_FIXTURES.items():
            repeat_rows(fixtures / fixture, tmp / "data" / f"{role}.jsonl", rows)
        env = environment(out)
        (tmp / "env.sh").write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="folder to write (replaced if it exists)")
    parser.add_argument("--rows", type=int, default=32, help="rows of each stand-in dataset (default 32)")
    parser.add_argument("--tokenizer-from", default=None,
                        help="a model folder whose tokenizer and chat template to use (default: converted SmolLM2)")


def run_cli(args: argparse.Namespace) -> int:
    make_stand_ins(args.out, rows=args.rows, tokenizer_from=args.tokenizer_from)
    print(f"wrote stand-ins to {args.out}; point the gpu profile at them with:\n"
          f"  source {Path(args.out) / 'env.sh'} && python -m apt_course run --profile gpu", file=sys.stdout)
    return 0
