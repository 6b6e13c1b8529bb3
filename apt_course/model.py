"""The tiny model: a standard transformers Llama, small enough to train on a laptop CPU in seconds.

Because it is an ordinary ``LlamaForCausalLM``, everything the course does with it (``save_pretrained``,
``from_pretrained``, TRL trainers, PEFT LoRA) is exactly what one does with a real model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM


def tiny_config(tokenizer, hidden_size: int = 128, layers: int = 4, heads: int = 4,
                intermediate_size: int = 384, max_positions: int = 256) -> LlamaConfig:
    """A Llama config of about 0.86M parameters over the course tokenizer's vocabulary."""
    if hidden_size % heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be divisible by heads ({heads})")
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id, rms_norm_eps=1e-5,
    )


def make_tiny_model(tokenizer, seed: int = 0, **config_kwargs) -> LlamaForCausalLM:
    """A freshly initialised tiny Llama (deterministic for a seed)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(tokenizer, **config_kwargs))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def save_model(model, tokenizer, path: str | Path) -> Path:
    """Save the model as safetensors with its tokenizer (what ``from_pretrained`` loads back), atomically:
    everything is written to a temporary folder beside ``path`` and renamed into place only when complete, so
    an interrupted save never leaves a half-written model (a previous model at ``path`` is replaced whole)."""
    import shutil
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            path.rename(old / "model")
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_pretrained(name_or_path: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = None):
    """Load a model and its tokenizer with ``from_pretrained``: a local folder or a Hub id (GPU profile).

    The same two calls serve the tiny checkpoints and a real model such as SmolLM2, so the GPU path is
    the CPU path with another name. A local-looking path that does not exist is a clear error.
    """
    text = str(name_or_path)
    looks_local = isinstance(name_or_path, Path) or text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_local and not Path(text).expanduser().is_dir():
        raise FileNotFoundError(
            f"model directory {text!r} does not exist. Pass a folder written by save_model()/save_pretrained() "
            "(for example apt_course.checkpoints.checkpoint_path('sft')), or a Hub id like "
            "'HuggingFaceTB/SmolLM2-135M-Instruct' when you are online."
        )
    tokenizer = AutoTokenizer.from_pretrained(text)
    if tokenizer.pad_token is None:  # many real models ship without one
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(text, **kwargs).to(device)
    return model, tokenizer


def load_reward_model(path_or_name, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """``(reward model, tokenizer)``: a causal-LM checkpoint (a new scalar head is added) or a saved RM.

    Works the same for the tiny checkpoints (a folder) and a Hub id (GPU profile).
    """
    from pathlib import Path

    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    text = str(path_or_name)
    if (isinstance(path_or_name, Path) or text.startswith((".", "/", "~"))) and not Path(text).expanduser().is_dir():
        raise FileNotFoundError(f"reward-model folder {text!r} does not exist: pass a folder written by "
                                "save_pretrained (e.g. apt_course.checkpoints.checkpoint_path('sft')) or a Hub id")
    tokenizer = AutoTokenizer.from_pretrained(text)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": dtype} if dtype is not None else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is the point here, not a problem
    try:
        rm = AutoModelForSequenceClassification.from_pretrained(text, num_labels=1, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    rm.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    return rm.to(device), tokenizer
