import math

import pytest
import torch

from apt_course.lm import (
    build_batch,
    completion_logprobs,
    completion_loss,
    generate,
    token_logprobs,
    truncate_pair,
)
from apt_course.model import make_tiny_model


@pytest.fixture(scope="module")
def model(tok):
    return make_tiny_model(tok, seed=0).eval()


def test_masking_drops_exactly_the_prompt_tokens(tok):
    b = build_batch(tok, ["<|user|>ab<|assistant|>", "xyz"], ["cd", "q"])
    # row 0: prompt 1+2+1 = 4 tokens, completion "cd" + eos = 3 tokens
    assert b["completion_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert b["completion_mask"][1].tolist() == [0, 0, 0, 1, 1, 0, 0]
    assert b["attention_mask"][1].tolist() == [1, 1, 1, 1, 1, 0, 0]
    assert (b["labels"] == -100).sum().item() == 4 + 5
    assert tok.decode(b["input_ids"][0][b["completion_mask"][0] == 1]) == "cd<eos>"


def test_logprobs_equal_a_hand_computed_sum(tok, model):
    b = build_batch(tok, ["<|user|>add 1 2<|assistant|>", "hi"], ["3", "there"])
    got = completion_logprobs(model, b, "sum")
    with torch.no_grad():
        for row in range(2):
            ids = b["input_ids"][row]
            n = int(b["attention_mask"][row].sum())
            logits = model(input_ids=ids[:n].unsqueeze(0)).logits[0]
            total = 0.0
            for t in range(1, n):
                if b["completion_mask"][row, t]:
                    total += torch.log_softmax(logits[t - 1], -1)[ids[t]].item()
            assert got[row].item() == pytest.approx(total, abs=1e-4)
    mean = completion_logprobs(model, b, "mean")
    counts = b["completion_mask"].sum(-1)
    assert torch.allclose(mean, got / counts, atol=1e-5)


def test_token_logprobs_of_uniform_logits():
    lp = token_logprobs(torch.zeros(1, 4, 10), torch.tensor([[1, 2, 3, 4]]))
    assert torch.allclose(lp, torch.full((1, 3), -math.log(10)))


def test_completion_loss_is_mean_nll_of_completion_tokens(tok, model):
    b = build_batch(tok, ["<|user|>add 1 2<|assistant|>", "hi"], ["3", "there"])
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = completion_loss(logits, b["labels"])
        total = completion_logprobs(model, b, "sum").sum()
    assert loss.item() == pytest.approx(-total.item() / b["completion_mask"].sum().item(), rel=1e-4)


def test_batch_errors(tok):
    with pytest.raises(ValueError, match="pair up"):
        build_batch(tok, ["a"], ["b", "c"])
    with pytest.raises(ValueError, match="empty batch"):
        build_batch(tok, [], [])
    with pytest.raises(ValueError, match="reduction"):
        completion_logprobs(None, {}, "max")


def test_generate_batched_equals_one_by_one(tok, model):
    prompts = ["<|user|>add 3 5<|assistant|>", "hello", "<|user|>reverse abcd<|assistant|>"]
    batched = generate(model, tok, prompts, max_new_tokens=6)
    single = [generate(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single and len(batched) == 3
    samples = generate(model, tok, prompts[:1], max_new_tokens=6, do_sample=True, num_return_sequences=4)
    assert len(samples) == 4


def test_long_rows_are_truncated_prompt_end_kept(tok):
    assert truncate_pair([1, 2, 3], [4, 5], 10) == ([1, 2, 3], [4, 5])        # fits: untouched
    assert truncate_pair([1, 2, 3, 4, 5, 6], [7, 8], 6) == ([3, 4, 5, 6], [7, 8])  # the prompt's start goes
    assert truncate_pair([1, 2, 3, 4], [5, 6, 7, 8, 9, 10], 6) == ([2, 3, 4], [5, 6, 7])  # half the budget kept
    assert truncate_pair([1] * 50, [2] * 50, None) == ([1] * 50, [2] * 50)
    batch = build_batch(tok, ["<|user|>" + "a" * 40 + "<|assistant|>"], ["bcd"], max_length=12)
    assert batch["input_ids"].shape == (1, 12)
    assert tok.decode(batch["input_ids"][0, -5:]) == "<|assistant|>bcd<eos>", "the prompt's end and the reply stay"
    assert batch["completion_mask"][0].tolist() == [0] * 8 + [1] * 4


def test_reward_batch_truncates_from_the_left(tok):
    from apt_course.reward_model import reward_batch

    batch = reward_batch(tok, ["x" * 50], ["yes"], max_length=10)
    assert batch["input_ids"].shape == (1, 10) and tok.decode(batch["input_ids"][0, -4:]) == "yes<eos>"
    assert tok.truncation_side == "right", "the tokenizer's own setting is restored"
