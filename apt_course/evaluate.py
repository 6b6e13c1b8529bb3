"""Measuring a model on held-out tiny-world problems."""

from __future__ import annotations

from collections import defaultdict

from .lm import generate
from .tokenizer import format_prompt
from .world import check_answer


def answer_all(model, tokenizer, examples: list[dict], max_new_tokens: int = 12, **gen_kwargs) -> list[str]:
    """Greedy completions of each example's chat prompt (with its ``system`` message if it has one),
    formatted by the model's own chat template (the course's, or a real model's on the GPU profile)."""
    prompts = [format_prompt(tokenizer, ex["prompt"], ex.get("system")) for ex in examples]
    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, **gen_kwargs)


def accuracy(model, tokenizer, examples: list[dict], max_new_tokens: int = 12, by_task: bool = False,
             checker=check_answer, **gen_kwargs):
    """Exact-match accuracy of greedy answers; with ``by_task`` also a dict task -> accuracy."""
    if not examples:
        raise ValueError("no examples to evaluate")
    outputs = answer_all(model, tokenizer, examples, max_new_tokens, **gen_kwargs)
    hits = [checker(ex, out) for ex, out in zip(examples, outputs)]
    acc = sum(hits) / len(hits)
    if not by_task:
        return acc
    groups = defaultdict(list)
    for ex, h in zip(examples, hits):
        groups[ex.get("task", "?")].append(h)
    return acc, {t: sum(v) / len(v) for t, v in sorted(groups.items())}
