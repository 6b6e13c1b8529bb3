"""Chapter 06 (partial): the RLHF-PPO pieces against hand-computed values, and a smoke run."""

import copy

import pytest
import torch

from apt_course.model import make_tiny_model
from apt_course.rlhf import PolicyWithValue, RLHFSettings, kl_shaped_rewards, token_gae, train_rlhf
from apt_course.tokenizer import build_tokenizer


def test_kl_shaped_rewards_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    r = kl_shaped_rewards(torch.tensor([2.0, -1.0]), logp, ref, mask, beta=0.1)
    want = torch.tensor([[-0.05, 0.0, 0.1 + 2.0], [-0.1, 0.0 - 1.0, 0.0]])  # score on each row's last token
    assert torch.allclose(r, want, atol=1e-6)


def test_token_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 9.0]])  # the third token is padding: its value must not leak in
    mask = torch.tensor([[1, 1, 0]])
    lam = 0.5
    adv, ret = token_gae(rewards, values, mask, lam=lam, gamma=1.0)
    d1 = 1.0 - 0.2                 # last real token: no bootstrap
    d0 = 0.0 + 0.2 - 0.5
    assert torch.allclose(adv, torch.tensor([[d0 + lam * d1, d1, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, adv + values * mask, atol=1e-6)


def test_value_head_starts_at_zero_and_settings_are_checked():
    tok = build_tokenizer()
    policy = PolicyWithValue(make_tiny_model(tok))
    ids = tok(["<|user|>add 1 2<|assistant|>3"], return_tensors="pt", add_special_tokens=False)
    logits, values = policy(ids["input_ids"], ids["attention_mask"])
    assert values.shape == ids["input_ids"].shape and torch.equal(values, torch.zeros_like(values))
    with pytest.raises(ValueError, match="multiple of minibatch_size"):
        RLHFSettings(batch_size=10, minibatch_size=4)
    with pytest.raises(ValueError, match="prompt set is empty"):
        train_rlhf(policy, copy.deepcopy(policy.lm), tok, [], lambda p, c: torch.zeros(len(c)))


def test_train_rlhf_raises_a_simple_reward():
    """Reward: the fraction of digits in the completion; PPO should raise it on a fresh tiny model."""
    torch.set_num_threads(1)
    tok = build_tokenizer()
    lm = make_tiny_model(tok, seed=0)
    policy = PolicyWithValue(lm)

    def digits(prompts, completions):
        return torch.tensor([sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions])

    history = train_rlhf(policy, copy.deepcopy(lm), tok, ["add 1 2", "sort 321", "copy ab"], digits,
                         RLHFSettings(steps=12, batch_size=32, minibatch_size=16, ppo_epochs=2, lr=3e-3, beta=0.01,
                                      max_new_tokens=4))
    assert sum(history["score"][-3:]) / 3 > sum(history["score"][:3]) / 3 + 0.1, history["score"]
    assert history["kl"][-1] > 0 and set(history) >= {"approx_kl", "clip_fraction", "explained_variance"}


def test_greeting_ground_truth_and_rm_reward_fn():
    from apt_course import world
    from apt_course.rlhf import greeting_prompts, is_polite, names_the_person, rm_reward_fn

    train, test = greeting_prompts(50, "train"), greeting_prompts(50, "test")
    assert not set(train) & set(test) and all(p.split()[-1] in world.NAMES for p in train)
    assert is_polite("hi, my name is bob", " happy to help, bob.")
    assert not is_polite("hi, my name is bob", "happy to help, ann.")   # the wrong person
    assert not is_polite("hi, my name is bob", "go away, bob.")
    assert names_the_person("thanks, i am eve", "go away, eve.") and not names_the_person("thanks, i am eve", "abc")

    calls = []

    class FakeRM(torch.nn.Module):  # scores each row by its length, through the real `score` batching
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids, attention_mask):
            calls.append(input_ids.shape)
            return type("Out", (), {"logits": attention_mask.sum(1, keepdim=True).float() * self.w})()

    tok = build_tokenizer()
    fn = rm_reward_fn(FakeRM(), tok)
    got = fn(["hello, i am ann", "hello, i am ann"], ["hi", "hello ann"])
    assert got.shape == (2,) and got[1] - got[0] == 7 and calls
