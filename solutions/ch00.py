"""Worked solutions of chapter 00's exercises (and one wrong answer each, to prove the checkers fail)."""

import math

import torch
import torch.nn.functional as F


def perplexity(loss):
    return math.exp(loss)


def count_tokens():
    # "<|user|>" + "add 3 5" (7 characters) + "<|assistant|>" = 1 + 7 + 1
    return 9


def masked_logprob(logits, input_ids, completion_mask):
    logp = F.log_softmax(logits[:, :-1], dim=-1)                      # position t predicts token t+1
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (picked * completion_mask[:, 1:]).sum(-1)


@torch.no_grad()
def greedy(model, tokenizer, prompt, max_new_tokens):
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = []
    for _ in range(max_new_tokens):
        next_id = model(input_ids=ids).logits[0, -1].argmax().item()
        if next_id == tokenizer.eos_token_id:
            break
        out.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return tokenizer.decode(out)


def masked_logprob_off_by_one(logits, input_ids, completion_mask):
    logp = F.log_softmax(logits[:, :-1], dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (picked * completion_mask[:, :-1]).sum(-1)


SOLUTIONS = {
    "ch00.perplexity": lambda: perplexity,
    "ch00.count_tokens": count_tokens,
    "ch00.masked_logprob": lambda: masked_logprob,
    "ch00.greedy": lambda: greedy,
}
WRONG = {
    "ch00.perplexity": lambda: (lambda loss: 2 ** loss),
    "ch00.count_tokens": lambda: 27,  # counting the role markers character by character
    "ch00.masked_logprob": lambda: masked_logprob_off_by_one,
    "ch00.greedy": lambda: (lambda model, tok, prompt, n: prompt),
}
