"""Chapter 05 exercises: Bradley–Terry probability, its loss, and reading the reward at the last real token."""

from __future__ import annotations

import math

import torch

from ..reward_model import bradley_terry_loss
from . import ExerciseFailed, _grading, exercise, expect, expect_close


@exercise("ch05.bt_prob", "Bradley–Terry: the probability that chosen beats rejected")
def check_bt_prob(fn):
    expect(callable(fn), "answer with a function prob(r_chosen, r_rejected) -> float")
    for rc, rr in ((1.5, 0.5), (0.0, 0.0), (-2.0, 1.0), (3.0, -3.0)):
        expect_close(fn(rc, rr), 1 / (1 + math.exp(-(rc - rr))), 1e-6, f"prob({rc}, {rr})")


@exercise("ch05.bt_loss", "The Bradley–Terry loss of a batch of reward pairs")
def check_bt_loss(fn):
    expect(callable(fn), "answer with a function loss(r_chosen, r_rejected) -> scalar tensor")
    g = torch.Generator().manual_seed(5)
    rc, rr = torch.randn(16, generator=g) * 3, torch.randn(16, generator=g) * 3
    got = fn(rc, rr)
    expect(torch.is_tensor(got) and got.dim() == 0, "return a scalar tensor (the mean over the batch)")
    want = bradley_terry_loss(rc, rr)
    if torch.allclose(got, bradley_terry_loss(rr, rc), atol=1e-5):
        raise ExerciseFailed("sign flipped: the loss must be small when r_chosen > r_rejected")
    expect(torch.allclose(got, want, atol=1e-5), f"got {got.item():.4f}, expected {want.item():.4f}: "
           "-mean(log sigmoid(r_chosen - r_rejected)); use F.logsigmoid for stability")
    big = fn(torch.tensor([200.0]), torch.tensor([-200.0]))
    expect(torch.isfinite(big) and big.item() < 1e-6, "not numerically stable for a large margin: use F.logsigmoid")


@exercise("ch05.last_token", "Read the reward at each row's last real token (right padding)")
def check_last_token(fn):
    expect(callable(fn), "answer with a function pick(scores, attention_mask) -> tensor of shape (B,)")
    g = torch.Generator().manual_seed(6)
    scores = torch.randn(3, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    got = fn(scores, mask)
    expect(torch.is_tensor(got) and got.shape == (3,), f"return shape (3,), got {getattr(got, 'shape', got)}")
    if torch.allclose(got, scores[:, -1]):
        raise ExerciseFailed("position -1 is padding for short rows: find each row's last position with mask = 1")
    want = scores[torch.arange(3), mask.sum(-1) - 1]
    expect(torch.allclose(got, want), f"got {got.tolist()}, expected {want.tolist()}")


# ---------------------------------------------------------------- build: the reward-model training step, against TRL

def _tiny_rm(seed: int = 5):
    """A tiny Llama with a scalar head (``LlamaForSequenceClassification``, one label), the head's weights scaled up so
    that the rewards differ by O(1) and a wrong formula shows in the loss."""
    from transformers import LlamaForSequenceClassification

    from ..model import tiny_config

    config = tiny_config(_grading.tokenizer())
    config.num_labels = 1
    torch.manual_seed(seed)
    rm = LlamaForSequenceClassification(config)
    with torch.no_grad():
        rm.score.weight.normal_(0, 0.5)
    return rm.train()


@exercise("ch05.rm_step", "The reward-model training step: Bradley-Terry on [chosen; rejected], the same as TRL's "
                          "RewardTrainer")
@_grading.own_rng
def check_rm_step(fn):
    from .. import world
    from ..reward_model import TRLRewardConfig, make_trl_reward_trainer, reward_batch, rewards

    expect(callable(fn), "answer with a function rm_step(rm, batch) -> loss, a scalar tensor with gradients")
    tok = _grading.tokenizer()
    pairs = world.preference_pairs(6, "train", seed=1)
    n = len(pairs)
    batch = reward_batch(tok, [p["prompt"] for p in pairs] * 2, [p["chosen"] for p in pairs] +
                         [p["rejected"] for p in pairs])
    rm = _tiny_rm()
    got, got_grads = _grading.loss_and_grads(fn(rm, {k: v.clone() for k, v in batch.items()}), rm, "rm_step")
    r = rewards(rm, batch)
    want, want_grads = _grading.loss_and_grads(bradley_terry_loss(r[:n], r[n:]), rm, "bradley_terry_loss")
    with torch.no_grad():
        r = r.detach()
        hidden = rm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        at_end = rm.score(hidden[:, -1]).squeeze(-1)
        wrong = {
            "sign flipped: the loss must be small when the CHOSEN answer's reward is the larger, "
            "-log sigmoid(r_chosen - r_rejected); the first half of the rows are the chosen answers":
                bradley_terry_loss(r[n:], r[:n]),
            "that is -mean sigmoid(r_chosen - r_rejected), the probability itself: Bradley-Terry maximises its "
            "LOG (F.logsigmoid)": -torch.sigmoid(r[:n] - r[n:]).mean(),
            "that is the sum over the pairs: take the mean, as TRL does": bradley_terry_loss(r[:n], r[n:]) * n,
            "the reward is read at position -1, which is padding for the shorter rows: the scalar head's output "
            "(rm(...).logits) already reads each row's last real token": bradley_terry_loss(at_end[:n], at_end[n:]),
        }
    formula = "-mean log sigmoid(r(chosen) - r(rejected)), r = rm(input_ids, attention_mask).logits[:, 0]"
    _grading.compare(got, want, wrong, formula)
    _grading.compare_grads(got_grads, want_grads)
    with _grading.quiet():  # TRL's RewardTrainer on the same pairs (it may pad further: the same rewards)
        trainer = make_trl_reward_trainer(rm, tok, pairs, TRLRewardConfig(steps=1, batch_size=n))
        trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
        trl_batch = {k: v for k, v in trl_batch.items() if torch.is_tensor(v)}
        trl_loss, trl_grads = _grading.loss_and_grads(trainer.compute_loss(trainer.model, trl_batch), trainer.model)
    _grading.compare(got, trl_loss, {}, formula, against="TRL RewardTrainer's")
    _grading.compare_grads(got_grads, trl_grads, against="TRL RewardTrainer's")


@exercise("ch05.predict_hack", "Predict, then run: how often the RM prefers a wrong answer with a friendly phrase")
def check_predict_hack(answer):
    _grading.prediction(answer, "c", ("a", "b", "c"),
                        "the RM saw friendly phrases only in CHOSEN answers and never on a wrong one: what does it learn about a "
                        "friendly phrase? Run the cell and see",
                        "(c): the RM learned 'friendly => good' next to 'correct => good', and the phrase outweighs the "
                        "wrong answer: held-out hack rate 0.83-0.86 at seeds 0-4 on the tiny profile "
                        "(benchmarks/results/seed_sweep.md). Chapter 06's policy finds this hack by itself.")
