"""Chapter 09 exercises: group advantages, the k3 KL estimator, loss aggregation, zero-variance groups."""

from __future__ import annotations

import math

import torch

from ..grpo import group_advantages, kl_k3
from . import _grading, exercise, expect, expect_close


def _need_function(fn, name):
    expect(callable(fn), f"pass your function itself (e.g. `{name}`), not {type(fn).__name__}")


@exercise("ch09.group_advantages", "group-normalised advantages")
def check_group_advantages(fn):
    _need_function(fn, "advantages")
    g = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 2, (24,), generator=g).float()
    rewards[:4] = 1.0  # a group that is all correct: no signal
    for G in (4, 8):
        got = fn(rewards.clone(), G)
        expect(got is not None, "your function returned None: did you forget `return`?")
        got = torch.as_tensor(got, dtype=torch.float32).flatten()
        want = group_advantages(rewards, G)
        expect(got.shape == want.shape, f"one advantage per completion: {tuple(want.shape)}, got {tuple(got.shape)}")
        batch = (rewards - rewards.mean()) / (rewards.std() + 1e-4)
        expect(not torch.allclose(got, batch, atol=1e-3), "you normalised over the whole batch: the baseline is each "
               "prompt's own group (view the rewards as (-1, G) and reduce over dim 1)")
        expect(torch.allclose(got[:4], torch.zeros(4), atol=1e-4),
               "a group whose rewards all tie must get advantage 0 (divide by std + 1e-4, never by 0)")
        expect(torch.allclose(got, want, atol=2e-3), f"wrong for G = {G}: A_i = (r_i - mean_group) / (std_group + 1e-4), "
               "with the unbiased std (torch's default, as TRL)")


@exercise("ch09.kl_k3", "the k3 KL estimator")
def check_kl_k3(fn):
    _need_function(fn, "k3")
    torch.manual_seed(0)
    logp, ref = torch.randn(5, 7) - 2, torch.randn(5, 7) - 2
    got = fn(logp, ref)
    expect(isinstance(got, torch.Tensor) and got.shape == logp.shape, "return one value per token, a tensor shaped "
           "like logp")
    expect(not torch.allclose(got, logp - ref, atol=1e-5), "that is k1 = log π - log π_ref: unbiased but it can be "
           "negative; k3 = r - log r - 1 with r = π_ref / π")
    expect(bool((got >= -1e-6).all()), "k3 is never negative (x - 1 >= log x): check the signs")
    expect(torch.allclose(got, kl_k3(logp, ref), atol=1e-5), "k3 = exp(ref - logp) - (ref - logp) - 1")
    # unbiased: the mean of k3 over samples from π equals KL(π || π_ref)
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.5, 0.3])
    exact = float((p * (p / q).log()).sum())
    expect_close(float((p * fn(p.log(), q.log())).sum()), exact, 1e-5, "E_π[k3] (should equal KL(π‖π_ref))")


@exercise("ch09.aggregate", "loss aggregation: grpo, dr_grpo, dapo")
def check_aggregate(fn):
    _need_function(fn, "aggregate")
    torch.manual_seed(1)
    per_token = torch.randn(4, 6)
    mask = (torch.arange(6)[None] < torch.tensor([[1], [3], [6], [2]])).float()
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        got = fn(per_token, mask, loss_type, 6)
        expect(got is not None, f"your function returned None for {loss_type!r}")
        want = {"grpo": ((per_token * mask).sum(-1) / mask.sum(-1)).mean(),
                "dr_grpo": (per_token * mask).sum() / (4 * 6),
                "dapo": (per_token * mask).sum() / mask.sum()}[loss_type]
        expect_close(got, float(want), 1e-5, f"your {loss_type!r} loss")


@exercise("ch09.zero_variance", "how often a group carries no signal")
def check_zero_variance(fn):
    _need_function(fn, "p_zero")
    for p, G in ((0.5, 2), (0.9, 8), (0.1, 8), (0.3, 16), (0.0, 4)):
        got = fn(p, G)
        want = p**G + (1 - p) ** G
        if abs(float(got) - p**G) < 1e-9 and abs(want - p**G) > 1e-6:
            expect(False, "you counted only the all-correct groups: an all-wrong group ties too")
        expect_close(got, want, 1e-9, f"P(zero variance) for p = {p}, G = {G}")
    expect(math.isclose(fn(0.5, 8), 2 * 0.5**8), "check p = 0.5, G = 8")


# ---------------------------------------------------------------- build: the GRPO training step, against TRL

def _grpo_rollout():
    """A tiny policy, 2 prompts x G = 4 sampled completions of varied lengths, their rewards, and the rollout's
    behaviour-policy and reference log-probs (perturbed from the current ones, so the clip and the KL both act)."""
    from ..lm import completion_logprobs, sample_groups

    model = _grading.tiny_lm(seed=0)
    torch.manual_seed(0)
    batch = sample_groups(model, _grading.tokenizer(),
                          ["<|user|>add 1 2<|assistant|>", "<|user|>sort 321<|assistant|>"], 4, 6)
    batch = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    B, T = batch["completion_ids"].shape
    batch["completion_mask"] = (torch.arange(T)[None] < torch.tensor([1, 2, 3, 4, 5, 6, 6, 3])[:, None]).long()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        logp = completion_logprobs(model, batch, "none")
    batch["old_logp"] = logp + 0.3 * torch.randn(B, T, generator=g)
    batch["ref_logp"] = logp + 0.3 * torch.randn(B, T, generator=g)
    batch["rewards"] = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.5, 1.0, 1.0])
    return model, batch


@exercise("ch09.grpo_step", "The GRPO training step: group advantages, the clipped ratio and the k3 leash, 'dapo' "
                            "aggregation, the same as TRL's GRPOTrainer")
@_grading.own_rng
def check_grpo_step(fn):
    from ..grpo import grpo_loss
    from ..lm import completion_logprobs

    _need_function(fn, "grpo_step")
    G, beta, eps = 4, 0.04, 0.2
    model, batch = _grpo_rollout()
    got, got_grads = _grading.loss_and_grads(fn(model, {k: v.clone() for k, v in batch.items()}, G, beta, eps), model,
                                             "grpo_step")
    adv = group_advantages(batch["rewards"], G)
    mask, old, ref = batch["completion_mask"], batch["old_logp"], batch["ref_logp"]
    logp = completion_logprobs(model, batch, "none")
    loss, _ = grpo_loss(logp, old, adv, mask, ref, beta, eps, loss_type="dapo", kl_correction=False)
    want, want_grads = _grading.loss_and_grads(loss, model, "grpo_loss")
    with torch.no_grad():
        logp = logp.detach()
        r = batch["rewards"]

        def variant(a=adv, **kw):
            args = dict(ref_logp=ref, beta=beta, epsilon=eps, loss_type="dapo", kl_correction=False) | kw
            return grpo_loss(logp, old, a, mask, **args)[0]

        k1 = ((logp - ref) * mask).sum() / mask.sum()
        wrong = {
            "the advantages are normalised over the whole batch: each prompt's group is its own baseline "
            "(view the rewards as (-1, G), mean and std over dim 1)": variant((r - r.mean()) / (r.std() + 1e-4)),
            "the KL term is missing: add beta * k3 per token, k3 = exp(ref - logp) - (ref - logp) - 1":
                variant(beta=0.0),
            "that KL is k1 = logp - ref_logp, which can be negative: GRPO uses k3 = exp(ref - logp) - (ref - logp) - 1":
                variant(beta=0.0) + beta * k1,
            "that is the 'grpo' aggregation (each answer's mean, then the mean over answers): 'dapo', TRL's default, "
            "averages over every completion token of the batch at once": variant(loss_type="grpo"),
            "the ratio is not clipped: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A)": variant(epsilon=1e9),
            "the advantages are not divided by the group's std (that is Dr. GRPO's choice, not the chapter's)":
                variant(group_advantages(r, G, scale=False)),
            "the KL term is multiplied by the ratio (TRL's use_bias_correction_kl): this exercise asks for the plain "
            "beta * k3": variant(kl_correction=True),
        }
    formula = ("mean over completion tokens of -min(ratio A, clip(ratio, 1-eps, 1+eps) A) + beta k3, A = (r - "
               "mean_group r) / (std_group r + 1e-4)")
    _grading.compare(got, want, wrong, formula)
    _grading.compare_grads(got_grads, want_grads)
    import tempfile

    from datasets import Dataset

    with _grading.quiet():
        from trl import GRPOConfig, GRPOTrainer

        rows = [{"prompt": "<|user|>add 1 2<|assistant|>"}] * 4 + [{"prompt": "<|user|>sort 321<|assistant|>"}] * 4
        args = GRPOConfig(output_dir=tempfile.gettempdir() + "/apt_course_exercise_trl", report_to="none",
                          use_cpu=True, bf16=False, max_steps=1, per_device_train_batch_size=8, num_generations=G,
                          max_completion_length=6, save_strategy="no", disable_tqdm=True, beta=0.0, epsilon=eps,
                          loss_type="dapo", use_bias_correction_kl=False)
        trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                              args=args, train_dataset=Dataset.from_list(rows), processing_class=_grading.tokenizer())
        trainer.beta = beta  # built with beta = 0 (no second model to load); the loss reads the given ref log-probs
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
        inputs = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
        inputs |= {"advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
                   "num_items_in_batch": mask.sum()}
        trl_loss, trl_grads = _grading.loss_and_grads(trainer._compute_loss(trainer.model, inputs), trainer.model)
    _grading.compare(got, trl_loss, {}, formula, against="TRL GRPOTrainer's")
    _grading.compare_grads(got_grads, trl_grads, against="TRL GRPOTrainer's")


@exercise("ch09.predict_mu2", "Predict, then run: two gradient steps per rollout (mu = num_iterations = 2)")
def check_predict_mu2(answer):
    _grading.prediction(answer, "a", ("a", "b", "c"),
                        "at the first of the mu steps the weights have not moved since the rollout: what is the ratio "
                        "pi_theta / pi_old then, and can the clip act? Run the cell",
                        "(a): at the first step pi_old is the policy itself, so the ratio is exactly 1, nothing is "
                        "clipped, and the gradient is mu = 1's (the cell checks it on a rollout). Only the later steps "
                        "are off-policy, which is where the clip earns its place: the chapter's run (mu = 1) logs a "
                        "clip fraction of exactly 0 at every step.")
