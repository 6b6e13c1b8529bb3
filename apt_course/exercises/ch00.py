"""Chapter 00 exercises: perplexity, tokens, masked log-probabilities, greedy decoding."""

from __future__ import annotations

import math

import torch

from ..lm import generate, token_logprobs
from ..model import make_tiny_model
from ..tokenizer import build_tokenizer, chat_prompt
from . import ExerciseFailed, exercise, expect, expect_close


@exercise("ch00.perplexity", "Perplexity from a mean next-token loss")
def check_perplexity(fn):
    expect(callable(fn), "answer with a function perplexity(loss) -> float")
    for loss in (0.0, 0.5, 1.0, math.log(104)):
        expect_close(fn(loss), math.exp(loss), 1e-6 * max(1.0, math.exp(loss)), f"perplexity({loss:.3f})")


@exercise("ch00.count_tokens", "How many tokens the chat prompt for 'add 3 5' has")
def check_count_tokens(n):
    tok = build_tokenizer()
    target = len(tok(chat_prompt("add 3 5"), add_special_tokens=False)["input_ids"])
    expect(isinstance(n, int), f"answer with an int, got {type(n).__name__}")
    expect(n == target, f"{n} is not it: remember each role marker is ONE token and every character is one")


@exercise("ch00.masked_logprob", "Sum the log-probabilities of the completion tokens only")
def check_masked_logprob(fn):
    expect(callable(fn), "answer with a function fn(logits, input_ids, completion_mask) -> tensor of shape (B,)")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    ids = torch.randint(11, (3, 6), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]])
    target = (token_logprobs(logits, ids) * mask[:, 1:]).sum(-1)
    got = fn(logits, ids, mask)
    expect(torch.is_tensor(got) and got.shape == (3,), f"expected a tensor of shape (3,), got {getattr(got, 'shape', got)}")
    if torch.allclose(got, (token_logprobs(logits, ids) * mask[:, :-1]).sum(-1), atol=1e-5):
        raise ExerciseFailed("off by one: logits at position t predict token t+1, so use mask[:, 1:]")
    expect(torch.allclose(got, target, atol=1e-4), "values differ: log_softmax, gather the next token, mask, sum")


@exercise("ch00.greedy", "Greedy decoding written by hand")
def check_greedy(fn):
    expect(callable(fn), "answer with a function greedy(model, tokenizer, prompt, max_new_tokens) -> str")
    tok = build_tokenizer()
    model = make_tiny_model(tok, seed=1)
    for p in ("<|user|>add 3 5<|assistant|>", "hello"):
        want = generate(model, tok, [p], max_new_tokens=8, strip=False)[0]
        got = fn(model, tok, p, 8)
        expect(isinstance(got, str), "return the completion as a string (without the prompt)")
        expect(got.split("<eos>")[0] == want, f"for prompt {p!r} you produced {got!r}, greedy decoding gives {want!r}")
