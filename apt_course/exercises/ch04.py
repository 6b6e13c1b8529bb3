"""Chapter 04 exercises: completion-only labels, the SFT loss over a batch, LoRA's parameter count."""

from __future__ import annotations

import torch

from ..lm import build_batch, completion_loss
from ..tokenizer import build_tokenizer, chat_prompt
from . import ExerciseFailed, _grading, exercise, expect


@exercise("ch04.labels", "Completion-only labels: -100 on the prompt, the token ids on the completion")
def check_labels(fn):
    expect(callable(fn), "answer with a function labels(input_ids, prompt_len) -> list of ints")
    tok = build_tokenizer()
    for user, answer in (("add 3 5", "8"), ("reverse abcd", "dcba")):
        b = build_batch(tok, [chat_prompt(user)], [answer])
        ids = b["input_ids"][0].tolist()
        prompt_len = int((b["completion_mask"][0] == 0).sum())
        got = fn(ids, prompt_len)
        expect(isinstance(got, (list, tuple)) and len(got) == len(ids),
               f"return one label per token ({len(ids)} for {user!r}), got {got!r}")
        want = b["labels"][0].tolist()
        expect(list(got) != ids, "every token keeps its id: the prompt must be masked with -100")
        expect(list(got) == want, f"for {user!r} the labels should be {want}, got {list(got)}")


@exercise("ch04.sft_loss", "The SFT loss of a batch: mean over ALL completion tokens of the batch")
def check_sft_loss(fn):
    expect(callable(fn), "answer with a function sft_loss(logits, labels) -> scalar tensor")
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 7, 13, generator=g)
    labels = torch.randint(13, (3, 7), generator=g)
    labels[0, :5] = -100  # a short completion (2 tokens) ...
    labels[1, :2] = -100  # ... a long one (5 tokens) ...
    labels[2, :4] = -100
    got = fn(logits, labels)
    expect(torch.is_tensor(got) and got.dim() == 0, f"return a scalar tensor, got {getattr(got, 'shape', got)!r}")
    want = completion_loss(logits, labels)
    per_row = torch.stack([completion_loss(logits[i:i + 1], labels[i:i + 1]) for i in range(3)]).mean()
    if torch.allclose(got, per_row, atol=1e-5):
        raise ExerciseFailed("that is the mean of per-sequence means: it over-weights short answers. "
                             "Average over every completion token of the batch at once")
    expect(torch.allclose(got, want, atol=1e-5),
           f"got {got.item():.4f}, expected {want.item():.4f}: shift (logits[:, :-1] predict labels[:, 1:]), "
           "cross-entropy, ignore -100")


@exercise("ch04.lora_params", "How many parameters LoRA trains: rank 8 on q_proj and v_proj of the tiny model")
def check_lora_params(n):
    from ..model import make_tiny_model
    from ..sft import add_lora

    tok = build_tokenizer()
    lora = add_lora(make_tiny_model(tok), r=8, target_modules=("q_proj", "v_proj"))
    want = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    expect(isinstance(n, int), f"answer with an int, got {type(n).__name__}")
    expect(n != 8 * 128 * 2, "that is one adapter in one layer: each Linear(in, out) gets A (r x in) and "
                             "B (out x r); count both modules in all 4 layers")
    expect(n == want, f"{n} is not it: each adapted Linear(in, out) adds r*(in + out); "
                      "q_proj and v_proj are 128 -> 128 here, in each of the 4 layers")


# ---------------------------------------------------------------- build: the SFT training step, graded against TRL

def _sft_batch():
    from .. import world
    from ..sft import to_sft_pairs

    examples = world.instruction_examples(6, "train", seed=3)  # prompts and answers of different lengths
    prompts, completions = to_sft_pairs(examples)
    return examples, build_batch(_grading.tokenizer(), prompts, completions)


@exercise("ch04.sft_step", "The SFT training step: the completion-only loss of a batch, the same as TRL's SFTTrainer")
@_grading.own_rng
def check_sft_step(fn):
    import torch.nn.functional as F

    from ..sft import TRLSFTConfig, make_trl_sft_trainer

    expect(callable(fn), "answer with a function sft_step(model, batch) -> loss, a scalar tensor with gradients")
    examples, full = _sft_batch()
    given = {k: full[k].clone() for k in ("input_ids", "attention_mask", "completion_mask")}  # no labels: build them
    model = _grading.tiny_lm(seed=4)
    got, got_grads = _grading.loss_and_grads(fn(model, given), model, "sft_step")
    logits = model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits
    want, want_grads = _grading.loss_and_grads(completion_loss(logits, full["labels"]), model, "completion_loss")
    with torch.no_grad():
        ids, real = full["input_ids"], full["attention_mask"].bool()
        every_token = ids.masked_fill(~real, -100)
        per_row = torch.stack([completion_loss(logits[i:i + 1], full["labels"][i:i + 1]) for i in range(len(ids))])
        wrong = {
            "no prompt mask: that loss trains on the prompt tokens too. Label the prompt -100 (completion_mask == 0) "
            "so that only the answer is learned": completion_loss(logits, every_token),
            "the padding is trained on too: label everything outside the completion -100":
                completion_loss(logits, ids),
            "no shift: the logits at position t predict token t + 1, so compare logits[:, :-1] with labels[:, 1:]":
                F.cross_entropy(logits.reshape(-1, logits.size(-1)), full["labels"].reshape(-1), ignore_index=-100),
            "that is the mean of per-sequence means: it over-weights short answers. Average over every completion "
            "token of the batch at once": per_row.mean(),
            "that is the sum over tokens: divide by the number of completion tokens (a mean, as TRL's)":
                completion_loss(logits, full["labels"]) * (full["labels"][:, 1:] != -100).sum(),
        }
    formula = "mean over the batch's completion tokens of -log p(token | the tokens before it)"
    _grading.compare(got, want, wrong, formula)
    _grading.compare_grads(got_grads, want_grads)
    with _grading.quiet():  # TRL's SFTTrainer on the same examples: its collated batch is this batch
        trainer = make_trl_sft_trainer(model, _grading.tokenizer(), examples, TRLSFTConfig(steps=1))
        trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(examples))])
        trl_batch = {k: v for k, v in trl_batch.items() if torch.is_tensor(v)}
        trl_loss, trl_grads = _grading.loss_and_grads(trainer.compute_loss(trainer.model, trl_batch), trainer.model)
    expect(torch.equal(trl_batch["input_ids"], full["input_ids"]), "internal: TRL tokenised the examples differently")
    _grading.compare(got, trl_loss, {}, formula, against="TRL SFTTrainer's")
    _grading.compare_grads(got_grads, trl_grads, against="TRL SFTTrainer's")


@exercise("ch04.predict_no_mask", "Predict, then run: the loss with the prompt mask removed")
def check_predict_no_mask(answer):
    _grading.prediction(answer, "higher", ("higher", "lower", "same"),
                        "look at what the prompt tokens are: the task's inputs (`reverse kqz`, `sort 846`) are random, so no "
                        "model can predict them, and the SFT model was never trained on them. Run the cell and compare",
                        "Higher, by far: the prompts' task inputs are random letters and digits that no model can "
                        "predict (the shipped SFT model: completion-only loss 0.005-0.02 on held-out reverse/sort/copy "
                        "tasks, 5.6 nats per token with the prompt counted too, at three test seeds). Without the mask "
                        "most of the loss, and of the gradient, would go to predicting the question instead of "
                        "answering it.")
