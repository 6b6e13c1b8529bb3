"""Preference data: real datasets' schemas -> ``{"prompt", "chosen", "rejected"}`` records.

Every converter returns a list of dicts with a ``prompt`` and two completions, ``chosen`` (preferred) and
``rejected``, validated by :func:`validate_pairs`. A ``prompt`` is either a plain user text (one turn; the
chat template is applied later, e.g. ``tokenizer.chat_prompt``) or, for multi-turn transcripts, a list of
chat messages ``[{"role": "user", "content": ...}, {"role": "assistant", ...}, ..., {"role": "user", ...}]``
ending with the user's turn. Chapters 05 (reward model) and 07 (DPO) read these.

* :func:`hh_rlhf_to_pairs`: Anthropic hh-rlhf raw transcripts (``chosen``/``rejected`` strings
  ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``); the shared prefix up to the last ``Assistant:`` is the prompt.
* :func:`ultrafeedback_to_pairs`: UltraFeedback-binarized (``prompt``, ``prompt_id``, ``chosen``/``rejected``
  as message lists, ``score_chosen``, ``score_rejected``).
* :func:`load_apt_pairs`: the APT pair format, ``{"pairs": [{"prompt", "chosen", "rejected"}]}`` (JSON).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .formats import read_apt_json

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


def validate_pairs(pairs, source: str = "preference data") -> list[dict]:
    """Check every row has a non-empty ``prompt``, ``chosen`` and ``rejected``, with chosen != rejected."""
    pairs = list(pairs)
    if not pairs:
        raise ValueError(f"{source} has zero rows: load a non-empty split (or check your filter)")
    for i, p in enumerate(pairs):
        if not isinstance(p, dict):
            raise TypeError(f"{source} row {i} is a {type(p).__name__}, expected a dict with prompt/chosen/rejected")
        for col in ("prompt", "chosen", "rejected"):
            if col not in p:
                raise KeyError(f"{source} row {i} has no {col!r} column; it has {sorted(p)}. "
                               "Each row needs 'prompt', 'chosen' and 'rejected'.")
            value = p[col]
            empty = not value.strip() if isinstance(value, str) else not value
            if empty:
                raise ValueError(f"{source} row {i}: column {col!r} is empty; fill it in or drop the row")
        if p["chosen"] == p["rejected"]:
            raise ValueError(f"{source} row {i}: 'chosen' equals 'rejected' ({str(p['chosen'])[:40]!r}), "
                             "so it says nothing about preference; drop the row")
    return pairs


def _split_turns(transcript: str, row: int, col: str) -> list[dict]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> ``[{"role": "user", ...}, {"role": "assistant", ...}]``."""
    if not transcript.startswith(HUMAN):
        raise ValueError(f"hh-rlhf row {row}: column {col!r} should start with '\\n\\nHuman:' "
                         f"(a raw transcript), it starts with {transcript[:20]!r}")
    parts = re.split(r"\n\n(Human|Assistant):", transcript)
    # parts = ["", "Human", " text", "Assistant", " text", ...]
    return [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
            for who, text in zip(parts[1::2], parts[2::2])]


def hh_rlhf_to_pairs(rows) -> list[dict]:
    """Anthropic/hh-rlhf rows ``{"chosen": transcript, "rejected": transcript}`` -> pairs.

    The two transcripts share everything up to the last ``Assistant:`` turn; that shared conversation is the
    prompt (a plain string when it is one user turn, else the message list), the last turns the completions.
    """
    out = []
    for i, row in enumerate(list(rows)):
        for col in ("chosen", "rejected"):
            if col not in row:
                raise KeyError(f"hh-rlhf row {i} has no {col!r} column (it has {sorted(row)}); "
                               "expected raw transcripts in 'chosen' and 'rejected'")
        chosen, rejected = _split_turns(row["chosen"], i, "chosen"), _split_turns(row["rejected"], i, "rejected")
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            raise ValueError(f"hh-rlhf row {i}: a transcript does not end with an Assistant turn")
        if chosen[:-1] != rejected[:-1]:
            raise ValueError(f"hh-rlhf row {i}: chosen and rejected do not share the conversation before the "
                             "last Assistant turn, so the prompt is ambiguous; drop the row")
        history = chosen[:-1]
        prompt = history[0]["content"] if len(history) == 1 else history
        out.append({"prompt": prompt, "chosen": chosen[-1]["content"], "rejected": rejected[-1]["content"]})
    return validate_pairs(out, "hh-rlhf")


def ultrafeedback_to_pairs(rows) -> list[dict]:
    """HuggingFaceH4/ultrafeedback_binarized rows -> pairs (prompt text, last assistant message of each side).

    Keeps ``score_chosen``/``score_rejected`` as ``margin`` = their difference (TRL's RewardTrainer can use it).
    """
    out = []
    for i, row in enumerate(list(rows)):
        for col in ("prompt", "chosen", "rejected"):
            if col not in row:
                raise KeyError(f"UltraFeedback row {i} has no {col!r} column (it has {sorted(row)})")
        sides = {}
        for col in ("chosen", "rejected"):
            msgs = row[col]
            if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) or \
                    msgs[-1].get("role") != "assistant":
                raise ValueError(f"UltraFeedback row {i}: column {col!r} must be a list of messages ending with "
                                 "the assistant's reply ({'role': 'assistant', 'content': ...})")
            sides[col] = msgs[-1].get("content", "")
        pair = {"prompt": row["prompt"], **sides}
        if "score_chosen" in row and "score_rejected" in row:
            pair["margin"] = float(row["score_chosen"]) - float(row["score_rejected"])
        out.append(pair)
    return validate_pairs(out, "UltraFeedback")


def load_apt_pairs(source) -> list[dict]:
    """The APT pair format: a JSON file (or its parsed dict) ``{"pairs": [{"prompt", "chosen", "rejected"}]}``."""
    return validate_pairs(read_apt_json(source, "pairs", "APT pair"), "APT pairs")


def read_jsonl(path) -> list[dict]:
    """Rows of a JSON-lines file (how the test fixtures store samples of the real datasets)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
