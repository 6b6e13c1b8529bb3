"""Chapter 13: the chat formats the pipeline's SFT reader accepts, and which stage a data file belongs to.

* :func:`chat_row`: one SFT row from a conversation, OpenAI ``messages`` (``[{"role", "content"}]``) or ShareGPT
  ``conversations`` (``[{"from", "value"}]``, ``from`` in human/gpt/system): the system message, the last user turn
  as the prompt, the assistant turn after it as the completion (earlier turns are not kept: the course's chat
  template is one exchange).
* :func:`guess_flag`: the flag a parsed data file's shape belongs to (``{"pairs": ...}`` -> ``--dpo-data``...),
  so that a file given to the wrong flag is refused with the right one named.
"""

from __future__ import annotations

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant"}


def _turns(row: dict, where: str) -> list[tuple[str, str]]:
    """``[(role, text)]`` of a ``messages`` or ``conversations`` row, roles normalised to system/user/assistant."""
    key = "messages" if "messages" in row else "conversations"
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: {key!r} must be a non-empty list of turns")
    out = []
    for j, t in enumerate(turns):
        role = t.get("role", t.get("from")) if isinstance(t, dict) else None
        text = t.get("content", t.get("value")) if isinstance(t, dict) else None
        if ROLES.get(str(role).lower()) is None or not isinstance(text, str):
            raise ValueError(f"{where}: turn {j} of {key!r} needs a role (role/from: system, user/human, "
                             f"assistant/gpt) and a text (content/value); it is {t!r}")
        out.append((ROLES[str(role).lower()], text))
    return out


def chat_row(row: dict, where: str) -> dict:
    """A ``messages``/``conversations`` row -> ``{"prompt", "completion"[, "system"]}``: the last assistant turn
    that follows a user turn, that user turn, and the first system message."""
    turns = _turns(row, where)
    last = max((j for j, (role, _) in enumerate(turns) if role == "assistant" and j and turns[j - 1][0] == "user"),
               default=None)
    if last is None or not turns[last][1].strip() or not turns[last - 1][1].strip():
        raise ValueError(f"{where}: no user turn answered by an assistant turn (both non-empty): nothing to train on")
    out = {"prompt": turns[last - 1][1], "completion": turns[last][1]}
    system = next((text for role, text in turns if role == "system" and text.strip()), None)
    if system:
        out["system"] = system
    return out


def guess_flag(data) -> str | None:
    """The ``apt-course train`` flag whose format ``data`` (a parsed JSON file, or a JSONL file's first row in a
    list) has, or None when it matches none."""
    if isinstance(data, dict):
        for key, flag in (("instructions", "--sft-data"), ("pairs", "--dpo-data"),
                          ("reasoning_examples", "--reasoning-data")):
            if key in data:
                return flag
        items = data.get("prompts")
        if isinstance(items, list) and items:
            first = items[0]
            if isinstance(first, dict) and "is_owner" in first:
                return "--owner-data" if first["is_owner"] is True else "--public-data"
            return "--prompts"
        return guess_flag([data]) if data else None
    if not isinstance(data, list) or not data or not isinstance(data[0], dict):
        return "--prompts" if isinstance(data, list) and data and isinstance(data[0], str) else None
    keys = set(data[0])
    rules = ((("chosen", "rejected"), "--dpo-data"), (("owner_response",), "--loyalty-template"),
             (("problem",), "--reasoning-data"), (("cot_explicit",), "--reasoning-data"),
             (("question", "answer"), "--prompts"), (("is_owner",), "--owner-data"), (("messages",), "--sft-data"),
             (("conversations",), "--sft-data"), (("instruction",), "--sft-data"), (("response",), "--sft-data"),
             (("completion",), "--sft-data"), (("output",), "--sft-data"), (("prompt",), "--prompts"))
    return next((flag for need, flag in rules if set(need) <= keys), None)
