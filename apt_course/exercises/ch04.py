"""Chapter 04 exercises: completion-only labels, the SFT loss over a batch, LoRA's parameter count."""

from __future__ import annotations

import torch

from ..lm import build_batch, completion_loss
from ..tokenizer import build_tokenizer, chat_prompt
from . import ExerciseFailed, exercise, expect


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
