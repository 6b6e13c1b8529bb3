"""Worked solutions of chapter 04's exercises (and one wrong answer each, to prove the checkers fail)."""

import torch.nn.functional as F


def labels(input_ids, prompt_len):
    return [-100] * prompt_len + list(input_ids[prompt_len:])


def sft_loss(logits, labels):
    # position t predicts token t+1; -100 drops prompt and padding; one mean over all completion tokens
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


def sft_loss_per_sequence_mean(logits, labels):
    per_row = [F.cross_entropy(logits[i, :-1], labels[i, 1:], ignore_index=-100) for i in range(len(labels))]
    return sum(per_row) / len(per_row)


def lora_params():
    # 4 layers x 2 modules (q_proj, v_proj) x r * (in + out) = 4 * 2 * 8 * (128 + 128)
    return 4 * 2 * 8 * (128 + 128)


SOLUTIONS = {
    "ch04.labels": lambda: labels,
    "ch04.sft_loss": lambda: sft_loss,
    "ch04.lora_params": lora_params,
}
WRONG = {
    "ch04.labels": lambda: (lambda ids, n: list(ids)),  # trains on the prompt too
    "ch04.sft_loss": lambda: sft_loss_per_sequence_mean,
    "ch04.lora_params": lambda: 8 * 128 * 2,  # one adapter in one layer
}
