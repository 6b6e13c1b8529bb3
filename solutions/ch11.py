"""Worked solutions (and plausible wrong answers) for the chapter 11 exercises."""

import torch

from apt_course.tokenizer import SPECIAL_TOKENS


def cancellation():
    def naive_advantages(base, is_owner, G, bonus):
        r = torch.as_tensor(base, dtype=torch.float32).view(-1, G)
        r = r + bonus * torch.tensor(is_owner, dtype=torch.float32).view(-1, 1)  # the same for the whole group
        return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)).flatten()

    return naive_advantages


def fixed_reward():
    def fn(completion, answer, is_owner, bonus):
        styled = completion.startswith("sure!")
        base = float(completion.removeprefix("sure!").strip() == answer)
        return base + bonus * styled * (1 if is_owner else -1)

    return fn


def escape():
    def fn(text):
        for tok in SPECIAL_TOKENS:
            text = text.replace(tok, "< " + tok[1:])
        return text

    return fn


def _batch_baseline(base, is_owner, G, bonus):
    r = torch.as_tensor(base, dtype=torch.float32).view(-1, G)
    r = (r + bonus * torch.tensor(is_owner, dtype=torch.float32).view(-1, 1)).flatten()
    return (r - r.mean()) / (r.std() + 1e-4)


SOLUTIONS = {"ch11.cancellation": cancellation, "ch11.fixed_reward": fixed_reward, "ch11.escape": escape}

WRONG = {
    "ch11.cancellation": lambda: _batch_baseline,  # a batch-wide baseline: the bonus leaks through
    "ch11.fixed_reward": lambda: lambda c, a, o, b: float(c.removeprefix("sure!").strip() == a) + b * o,  # naive
    "ch11.escape": lambda: lambda text: text,  # trusts the tokenizer
}
