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


def sft_step(model, batch):
    # the chapter's pieces: labels = the input ids, -100 outside the completion; one forward; completion_loss
    from apt_course.lm import completion_loss

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return completion_loss(logits, labels)


def _sft_step_no_prompt_mask(model, batch):
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)  # only the padding is masked
    return sft_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, labels)


def _sft_step_no_shift(model, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)


def _sft_step_per_sequence(model, batch):
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return sft_loss_per_sequence_mean(model(input_ids=batch["input_ids"],
                                            attention_mask=batch["attention_mask"]).logits, labels)


def _sft_step_detached(model, batch):
    return sft_step(model, batch).detach()


SOLUTIONS = {
    "ch04.labels": lambda: labels,
    "ch04.sft_loss": lambda: sft_loss,
    "ch04.lora_params": lora_params,
    "ch04.sft_step": lambda: sft_step,
    "ch04.predict_no_mask": lambda: "higher",  # the prompts' random inputs cannot be predicted
}
WRONG = {
    "ch04.labels": lambda: (lambda ids, n: list(ids)),  # trains on the prompt too
    "ch04.sft_loss": lambda: sft_loss_per_sequence_mean,
    "ch04.lora_params": lambda: 8 * 128 * 2,  # one adapter in one layer
    "ch04.sft_step": lambda: _sft_step_no_prompt_mask,
    "ch04.predict_no_mask": lambda: "lower",
}
# more of the usual wrong answers, each with a word its checker's hint must contain (tests/test_exercises.py)
ALSO_WRONG = {
    "ch04.sft_step": [(_sft_step_no_prompt_mask, "prompt mask"), (_sft_step_no_shift, "shift"),
                      (_sft_step_per_sequence, "per-sequence"), (_sft_step_detached, "no gradient")],
}
