"""Chapter 06: the RLHF-PPO pieces against hand-computed values, RLOO against TRL's RLOOTrainer on the same
batch, a smoke run, and the GPU path on a locally saved model."""

import copy
import math
from pathlib import Path

import pytest
import torch

from apt_course.lm import completion_logprobs, sample_groups
from apt_course.model import make_tiny_model
from apt_course.rlhf import (
    PolicyWithValue,
    RLHFConfig,
    kl_shaped_rewards,
    rloo_advantages,
    rloo_loss,
    token_gae,
    train_rlhf,
)

FIXTURES = Path(__file__).parent / "fixtures"


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
    adv, ret = token_gae(rewards, values, mask, gae_lambda=lam, gamma=1.0)
    d1 = 1.0 - 0.2                 # last real token: no bootstrap
    d0 = 0.0 + 0.2 - 0.5
    assert torch.allclose(adv, torch.tensor([[d0 + lam * d1, d1, 0.0]]), atol=1e-6)
    assert torch.allclose(ret, adv + values * mask, atol=1e-6)


def test_value_head_starts_at_zero_and_settings_are_checked(tok):
    policy = PolicyWithValue(make_tiny_model(tok))
    ids = tok(["<|user|>add 1 2<|assistant|>3"], return_tensors="pt", add_special_tokens=False)
    logits, values = policy(ids["input_ids"], ids["attention_mask"])
    assert values.shape == ids["input_ids"].shape and torch.equal(values, torch.zeros_like(values))
    with pytest.raises(ValueError, match="multiple of minibatch_size"):
        RLHFConfig(batch_size=10, minibatch_size=4)
    with pytest.raises(ValueError, match="prompt set is empty"):
        train_rlhf(policy, copy.deepcopy(policy.lm), tok, [], lambda p, c: torch.zeros(len(c)))


@pytest.mark.parametrize("reward_fn, error, msg", [
    (lambda completions: [0.0] * len(completions), TypeError, "cannot be called as"),
    ("not a function", TypeError, "must be a function"),
    (lambda p, c: [0.0], ValueError, "returned 1 scores for 4 completions"),
    (lambda p, c: [float("nan")] * len(c), ValueError, "finite score"),
    (lambda p, c: 1 / 0, RuntimeError, "raised ZeroDivisionError"),
])
def test_bad_reward_functions_are_clear_errors(tok, reward_fn, error, msg):
    lm = make_tiny_model(tok, seed=0)
    with pytest.raises(error, match=msg):
        train_rlhf(PolicyWithValue(lm), copy.deepcopy(lm), tok, ["add 1 2"], reward_fn,
                   RLHFConfig(steps=1, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=2))


def test_train_rlhf_raises_a_simple_reward(tok):
    """Reward: the fraction of digits in the completion; PPO should raise it on a fresh tiny model."""
    lm = make_tiny_model(tok, seed=0)
    policy = PolicyWithValue(lm)

    def digits(prompts, completions):
        return torch.tensor([sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions])

    history = train_rlhf(policy, copy.deepcopy(lm), tok, ["add 1 2", "sort 321", "copy ab"], digits,
                         RLHFConfig(steps=12, batch_size=32, minibatch_size=16, ppo_epochs=2, lr=3e-3, beta=0.01,
                                      max_new_tokens=4))
    assert sum(history["score"][-3:]) / 3 > sum(history["score"][:3]) / 3 + 0.1, history["score"]
    assert history["kl"][-1] > 0 and set(history) >= {"approx_kl", "clip_fraction", "explained_variance"}


def test_greeting_ground_truth_and_rm_reward_fn(tok):
    from apt_course import world
    from apt_course.rlhf import rm_reward_fn
    from apt_course.world import friendly_but_wrong, greeting_prompts, is_polite, names_the_person

    train, test = greeting_prompts(50, "train"), greeting_prompts(50, "test")
    assert not set(train) & set(test) and all(p.split()[-1] in world.NAMES for p in train)
    assert is_polite("hi, my name is bob", " happy to help, bob.")
    assert not is_polite("hi, my name is bob", "happy to help, ann.")   # the wrong person
    assert not is_polite("hi, my name is bob", "go away, bob.")
    assert friendly_but_wrong("hi, my name is bob", "happy to help, boe.")
    assert friendly_but_wrong("hi, my name is bob", "you are welcome, bob, nice to meet you!")
    assert not friendly_but_wrong("hi, my name is bob", "happy to help, bob.")
    assert not friendly_but_wrong("hi, my name is bob", "go away, boe.")
    assert names_the_person("thanks, i am eve", "go away, eve.") and not names_the_person("thanks, i am eve", "abc")

    calls = []

    class FakeRM(torch.nn.Module):  # scores each row by its length, through the real `score` batching
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids, attention_mask):
            calls.append(input_ids.shape)
            return type("Out", (), {"logits": attention_mask.sum(1, keepdim=True).float() * self.w})()

    fn = rm_reward_fn(FakeRM(), tok)
    got = fn(["hello, i am ann", "hello, i am ann"], ["hi", "hello ann"])
    assert got.shape == (2,) and got[1] - got[0] == 7 and calls


# ---------------------------------------------------------------- RLOO by hand and against TRL


def test_rloo_advantages_by_hand():
    adv = rloo_advantages([1.0, 2.0, 6.0, 0.0, 0.0, 0.0], group_size=3, normalize=False)
    # leave-one-out baselines: (2+6)/2, (1+6)/2, (1+2)/2 -> 1-4, 2-3.5, 6-1.5; a tied group gets 0
    assert torch.allclose(adv, torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0]))
    # the KL penalty comes off the reward first: r = s - beta * KL
    kl = torch.tensor([10.0, 0.0])
    assert torch.allclose(rloo_advantages([1.0, 1.0], kl, 2, beta=0.1, normalize=False), torch.tensor([-1.0, 1.0]))
    normed = rloo_advantages([1.0, 2.0, 6.0, 0.0, 0.0, 0.0], group_size=3)
    raw = torch.tensor([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    assert torch.allclose(normed, (raw - raw.mean()) / (raw.std() + 1e-4), atol=1e-6)
    nan = rloo_advantages([1.0, float("nan"), 3.0], group_size=3, normalize=False)
    assert torch.allclose(nan, torch.tensor([-2.0, 0.0, 2.0])), "a NaN score is no sibling and gets A = 0"
    for bad, msg in ((1, "group_size must be"), (4, "do not split")):
        with pytest.raises(ValueError, match=msg):
            rloo_advantages([1.0, 2.0, 3.0], group_size=bad)


def test_rloo_loss_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    assert torch.isclose(rloo_loss(logp, logp, adv, mask), torch.tensor((-1.0 + 2.0) / 2))  # on-policy: -mean A
    # sequence ratio exp(0 - 2 log 0.5) = 4 on row 0 (A > 0): clipped at 1.2; padding does not count
    old = torch.tensor([[math.log(0.5), math.log(0.5), 5.0], [0.0, 0.0, 0.0]])
    assert torch.isclose(rloo_loss(logp, old, adv, mask), torch.tensor((-1.2 + 2.0) / 2))


ROWS = ([{"prompt": "<|user|>hello, i am ann<|assistant|>"}] * 4
        + [{"prompt": "<|user|>thanks, i am bob<|assistant|>"}] * 4)


@pytest.mark.parametrize("normalize", [True, False])
def test_rloo_advantages_match_trl(online_trainer, normalize):
    fixed = [1.0, 0.0, 3.0, 1.0, 0.5, None, 0.5, 2.0]

    def fixed_reward(prompts, completions, **kwargs):
        return list(fixed)

    trainer, ds = online_trainer("RLOO", ROWS, [fixed_reward], beta=0.0, normalize_advantages=normalize)
    out = trainer._generate_and_score_completions([ds[i] for i in range(8)])
    mine = rloo_advantages([float("nan") if v is None else v for v in fixed], None, 4, normalize=normalize)
    assert torch.allclose(out["advantages"], mine, atol=1e-6), (out["advantages"], mine)


def test_rloo_loss_and_gradient_match_trl(online_trainer, tok):
    trainer, _ = online_trainer("RLOO", ROWS, [lambda prompts, completions, **kw: [0.0] * len(completions)],
                                beta=0.0, epsilon=0.2)
    model = trainer.model
    torch.manual_seed(0)
    batch = sample_groups(model, tok, ["<|user|>hello, i am ann<|assistant|>", "<|user|>hi, i am bob<|assistant|>"],
                          4, 6)
    B, T = batch["completion_ids"].shape
    batch["completion_mask"] = (torch.arange(T)[None] < torch.tensor([1, 2, 3, 4, 5, 6, 6, 3])[:, None]).long()
    with torch.no_grad():
        logp = completion_logprobs(model, batch, "none")
    old, adv = logp + 0.1 * torch.randn(B, T), torch.randn(B)
    inputs = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    inputs |= {"advantages": adv, "old_logps": (old * batch["completion_mask"]).sum(1)}
    trl_loss = trainer._compute_loss(model, inputs)
    trl_grad = torch.autograd.grad(trl_loss, model.model.embed_tokens.weight)[0]
    mine = rloo_loss(completion_logprobs(model, batch, "none"), old, adv, batch["completion_mask"], epsilon=0.2)
    my_grad = torch.autograd.grad(mine, model.model.embed_tokens.weight)[0]
    assert torch.allclose(trl_loss, mine, atol=1e-6), (trl_loss.item(), mine.item())
    assert torch.allclose(trl_grad, my_grad, atol=1e-6)


def test_ppo_sequence_reward_is_rloos_kl_penalised_reward():
    """Summed over a reply, PPO's per-token shaped rewards are exactly the reward RLOO uses: s - β KL."""
    torch.manual_seed(0)
    logp, ref = -torch.rand(4, 5), -torch.rand(4, 5)
    mask = (torch.arange(5)[None] < torch.tensor([5, 3, 1, 4])[:, None]).long()
    scores, beta = torch.randn(4), 0.3
    kl = ((logp - ref) * mask).sum(1)
    assert torch.allclose(kl_shaped_rewards(scores, logp, ref, mask, beta).sum(1), scores - beta * kl, atol=1e-6)


# ---------------------------------------------------------------- ground truth along the run, and the GPU path


def test_train_rlhf_evaluates_along_the_run(tok):
    lm = make_tiny_model(tok, seed=0)
    calls = []

    def eval_fn(m):
        calls.append(m is lm)
        return {"quality": 0.5}

    history = train_rlhf(PolicyWithValue(lm), copy.deepcopy(lm), tok, ["add 1 2"], lambda p, c: torch.zeros(len(c)),
                         RLHFConfig(steps=3, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=2),
                         eval_fn=eval_fn, eval_every=2)
    assert [e["step"] for e in history["eval"]] == [0, 2, 3] and all(calls)
    assert history["eval"][0]["quality"] == 0.5


def test_gpu_path_on_a_locally_saved_model(tiny_path, monkeypatch):
    """The notebook's PROFILE = "gpu" branch: load_model, hh-rlhf prompts and a reward model loaded by path,
    through the same from_pretrained calls, on local folders and the hh-rlhf fixture."""
    from apt_course.data import load_rlhf_data
    from apt_course.profiles import get_profile, load_model
    from apt_course.rlhf import load_rlhf_reward_fn

    assert get_profile("gpu").datasets["preference"] == "Anthropic/hh-rlhf"
    profile = get_profile("gpu", model=tiny_path, reward_model=tiny_path,  # local stand-ins for the Hub names
                          datasets={"preference": str(FIXTURES / "hh_rlhf_sample.jsonl")})
    data = load_rlhf_data(profile, n_train=2, n_test=1)
    assert data["quality"] is None
    assert data["train"] == ["What are some cuss words in english?", "What is the capital of France?"]
    with pytest.raises(ValueError, match="max_prompt_chars"):
        load_rlhf_data(profile, n_train=2, n_test=1, max_prompt_chars=5)
    model, tokenizer = load_model(profile)
    reward_fn = load_rlhf_reward_fn(profile)
    assert reward_fn(data["test"], ["Paris."]).shape == (1,)
    history = train_rlhf(PolicyWithValue(model), copy.deepcopy(model), tokenizer, data["train"], reward_fn,
                         RLHFConfig(steps=1, batch_size=2, minibatch_size=1, ppo_epochs=1, max_new_tokens=3))
    assert len(history["score"]) == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_rlhf_reward_fn(profile, reward_model="./no-such-rm")


def test_best_of_n_kl_is_the_exact_kl_of_best_of_n_without_ties():
    """On a policy uniform over m replies with distinct rewards, best-of-n picks reply i (in reward order) with
    probability (i/m)^n - ((i-1)/m)^n; its exact KL to the policy tends to log n - (n-1)/n as m grows."""
    import math

    from apt_course.rlhf import best_of_n_kl

    m = 20000
    for n in (1, 2, 4, 16):
        i = torch.arange(1, m + 1, dtype=torch.float64)
        p_bon = (i / m) ** n - ((i - 1) / m) ** n
        exact = (p_bon * torch.log(p_bon * m)).sum().item()
        assert abs(exact - best_of_n_kl(n)) < 2e-3, (n, exact, best_of_n_kl(n))
    assert best_of_n_kl(1) == 0 and best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    with pytest.raises(ValueError, match="n >= 1"):
        best_of_n_kl(0)


def test_best_of_n_keeps_the_highest_scored_of_the_first_n():
    from apt_course.rlhf import best_of_n

    def reward_fn(prompts, completions):  # longer is better
        return torch.tensor([float(len(c)) for c in completions])

    samples = [["a", "aaa", "aa", "aaaa"], ["bb", "b", "bbbbb", "bbb"]]
    out = best_of_n(["p", "q"], samples, reward_fn, ns=(1, 2, 4))
    assert out[1]["replies"] == ["a", "bb"] and out[2]["replies"] == ["aaa", "bb"]
    assert out[4]["replies"] == ["aaaa", "bbbbb"] and out[4]["score"] == 4.5
    assert out[1]["kl_bound"] == 0
    with pytest.raises(ValueError, match="best-of-8 needs at least that many samples"):
        best_of_n(["p", "q"], samples, reward_fn, ns=(8,))
    with pytest.raises(ValueError, match="one group per prompt"):
        best_of_n(["p"], samples, reward_fn)
