"""Verifiable rewards (chapter 09): programs that score a completion, and the datasets they score.

Every reward function follows TRL's convention ``fn(prompts, completions, **kwargs) -> list[float]``:
keyword arguments, one float per completion, extra dataset columns (``answer``) as keyword lists. A
completion is a string, or (TRL's conversational format) a list of messages whose last one is the
assistant's; both are accepted.

Datasets: tiny-world problems (``world.verifiable_problems``), GSM8K rows (``openai/gsm8k``: ``question``,
``answer`` ending in ``#### <number>``) and the APT prompts format, a JSON object ``{"prompts": [...]}``
whose items are strings or ``{"prompt": ..., "answer": ...}`` objects. :func:`load_prompts` reads all
three into rows ``{"prompt", "answer"}`` for :func:`apt_course.grpo.train_grpo` and ``GRPOTrainer``.
"""

from __future__ import annotations

import re

from .world import extract_final_answer, normalize

_FORMAT = re.compile(r"^(<think>[^<]+</think>)?[0-9a-z]+$")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def completion_text(completion) -> str:
    """The text of a completion: a string, a message dict, or a list of messages (the last one's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)) and completion:
        return completion_text(completion[-1])
    raise TypeError(f"cannot read a completion of type {type(completion).__name__}: expected a string or messages")


# ---------------------------------------------------------------- tiny world

def correctness_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the final answer (after any ``</think>``) equals the row's ``answer``, else 0.0."""
    return [float(extract_final_answer(completion_text(c)) == str(a)) for c, a in zip(completions, answer)]


def format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion is well formed: an optional closed ``<think>…</think>`` block, then one bare
    answer of digits or lower-case letters (no spaces, no chatter), else 0.0."""
    return [float(bool(_FORMAT.match(normalize(completion_text(c))))) for c in completions]


# ---------------------------------------------------------------- GSM8K and numbers

def gsm8k_final_answer(answer: str) -> str:
    """The number after ``####`` in a GSM8K ``answer`` field, commas removed (``'1,200'`` -> ``'1200'``)."""
    if "####" not in answer:
        raise ValueError(f"a GSM8K answer ends with '#### <number>'; this one has no '####': {answer[-80:]!r}")
    return answer.split("####")[-1].strip().replace(",", "").rstrip(".")


def extract_number(text: str) -> str | None:
    """The number a completion gives as its answer: after ``####``, else in ``\\boxed{}``, else the last one."""
    text = completion_text(text)
    for pattern in (r"####\s*([^\n]+)", r"\\boxed\{([^}]*)\}"):
        m = re.search(pattern, text)
        if m:
            found = _NUMBER.findall(m.group(1))
            if found:
                return found[0].replace(",", "")
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def numbers_equal(a: str | None, b: str | None) -> bool:
    """Numeric equality of two number strings (``'72'`` == ``'72.0'``); False when either is missing."""
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return False


def math_correctness_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion's number (:func:`extract_number`) equals the row's ``answer``, else 0.0."""
    return [float(numbers_equal(extract_number(completion_text(c)), str(a))) for c, a in zip(completions, answer)]


def math_format_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 when the completion ends with a ``#### <number>`` line, as GSM8K's solutions do."""
    return [float(bool(re.search(r"####\s*-?\d[\d,]*(\.\d+)?\s*$", completion_text(c).strip())))
            for c in completions]


# ---------------------------------------------------------------- strict and lenient answer parsing

def strict_correct(completion, answer) -> bool:
    """Strict parsing: the reply (after any ``</think>``) is the answer and nothing else, a final full stop aside
    (``'27'`` and ``'27.'`` pass for 27; ``'14 + 13 = 27'`` and ``'it is cba'`` do not)."""
    got = re.sub(r"[.\s]+$", "", extract_final_answer(completion_text(completion)))
    want = str(answer).strip()
    return got == want or (bool(re.fullmatch(_NUMBER, got)) and numbers_equal(got.replace(",", ""), want))


def lenient_correct(completion, answer) -> bool:
    """Lenient parsing: the answer can be found in the reply (after any ``</think>``): its last number equals a
    numeric answer, or one of its words is the answer (``'14 + 13 = 27'``, ``'i guess it is cba, maybe.'``).
    Everything strict parsing accepts, and replies a grader of format would reject; a reward built on it can be
    gamed (a reply listing many candidates)."""
    text = extract_final_answer(completion_text(completion))
    want = str(answer).strip()
    if re.fullmatch(_NUMBER, want):
        found = _NUMBER.findall(text)
        return bool(found) and numbers_equal(found[-1].replace(",", ""), want.replace(",", ""))
    return want in re.findall(r"\w+", text) or strict_correct(completion, answer)
