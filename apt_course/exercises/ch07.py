"""Chapter 07 exercises: the DPO loss, SimPO from summed log-probs, the weight DPO gives each pair."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _grading, exercise, expect


def _need_function(fn, name):
    expect(callable(fn), f"pass your function itself (e.g. `{name}`), not {type(fn).__name__}")


def _scalar(out, name):
    expect(out is not None, f"your {name} returned None: did you forget `return`?")
    expect(isinstance(out, torch.Tensor) and out.dim() == 0, f"{name} must return a scalar torch tensor")
    return out.item()


@exercise("ch07.dpo_loss", "the DPO loss")
def check_dpo_loss(fn):
    _need_function(fn, "dpo_loss")
    g = torch.Generator().manual_seed(0)
    for beta in (0.1, 0.5, 2.0):
        pi_c, pi_r, ref_c, ref_r = (-10 * torch.rand(6, generator=g) for _ in range(4))
        got = _scalar(fn(pi_c, pi_r, ref_c, ref_r, beta), "dpo_loss")
        want = -F.logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean().item()
        no_ref = -F.logsigmoid(beta * (pi_c - pi_r)).mean().item()
        expect(abs(got - no_ref) > 1e-6 or abs(got - want) < 1e-5,
               "the reference model is missing: the reward is beta * (log pi - log pi_ref)")
        flipped = -F.logsigmoid(-beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean().item()
        expect(abs(got - flipped) > 1e-6, "the sign is flipped: the chosen answer's reward comes first")
        expect(abs(got - want) < 1e-5, f"wrong for beta = {beta}: L = -mean log sigmoid(beta * (chosen log-ratio "
                                       "- rejected log-ratio))")


@exercise("ch07.simpo_from_sums", "SimPO from summed log-probs")
def check_simpo(fn):
    _need_function(fn, "simpo")
    sum_c, sum_r = torch.tensor([-2.0, -9.0, -4.0]), torch.tensor([-30.0, -5.0, -4.5])
    len_c, len_r = torch.tensor([2.0, 3.0, 4.0]), torch.tensor([20.0, 1.0, 3.0])
    got = _scalar(fn(sum_c, sum_r, len_c, len_r, 2.0, 0.5), "simpo")
    want = -F.logsigmoid(2.0 * (sum_c / len_c - sum_r / len_r) - 0.5).mean().item()
    unnormalised = -F.logsigmoid(2.0 * (sum_c - sum_r) - 0.5).mean().item()
    expect(abs(got - unnormalised) > 1e-6, "SimPO divides each log-prob by its length before comparing")
    expect(abs(got - want) < 1e-5, "L = -mean log sigmoid(beta * (sum_c/len_c - sum_r/len_r) - gamma)")


@exercise("ch07.pair_weight", "how much DPO pushes on a pair")
def check_pair_weight(fn):
    _need_function(fn, "pair_weight")
    for beta in (0.1, 1.0):
        margin = torch.tensor([-5.0, 0.0, 2.0, 20.0], requires_grad=True)
        (-F.logsigmoid(beta * margin)).sum().backward()
        want = -margin.grad / beta  # dL/d(beta*margin) = -sigmoid(-beta*margin)
        got = fn(margin.detach(), beta)
        expect(got is not None, "your pair_weight returned None: did you forget `return`?")
        got = torch.as_tensor(got, dtype=torch.float32)
        expect(got.shape == margin.shape, f"one weight per pair: shape {tuple(margin.shape)}, got {tuple(got.shape)}")
        expect(not torch.allclose(got, 1 - want, atol=1e-5),
               "reversed: pairs the model already ranks right (large margin) get the SMALL weight")
        expect(torch.allclose(got, want, atol=1e-5), "the weight is sigmoid(-beta * margin): the derivative of the "
                                                     "loss with respect to beta * margin, negated")


# ---------------------------------------------------------------- build: the DPO training step, against TRL

@exercise("ch07.dpo_step", "The DPO training step: summed completion log-probs of policy and frozen reference, the "
                           "same as TRL's DPOTrainer")
@_grading.own_rng
def check_dpo_step(fn):
    from .. import data, world
    from ..dpo import pair_batch_logps, pair_loss
    from ..lm import build_pair_batch

    _need_function(fn, "dpo_step")
    tok, beta = _grading.tokenizer(), 0.2
    pairs = world.preference_pairs(6, "train", seed=0)
    batch = build_pair_batch(tok, pairs)
    policy, ref = _grading.tiny_lm(seed=1), _grading.tiny_lm(seed=0)  # they differ, so the reference matters
    ref.eval()
    got, got_grads = _grading.loss_and_grads(fn(policy, ref, {k: v.clone() for k, v in batch.items()}, beta), policy,
                                             "dpo_step", frozen=ref)
    want, want_grads = _grading.loss_and_grads(pair_loss(policy, ref, batch, "sigmoid", beta), policy, "pair_loss")
    with torch.no_grad():
        c, r, lc, lr = pair_batch_logps(policy, batch)
        rc, rr, _, _ = pair_batch_logps(ref, batch)
        wrong = {
            "the reference model is missing: the implicit reward is beta * (log pi - log pi_ref), for the chosen and "
            "the rejected answer": -F.logsigmoid(beta * (c - r)).mean(),
            "sign flipped: the chosen answer's log-ratio comes first": -F.logsigmoid(-beta * ((c - rc) - (r - rr))).mean(),
            "those are mean token log-probs (length-normalised, SimPO's and ORPO's): DPO sums the completion's "
            "token log-probs, log pi(y|x) = sum_t log pi(y_t | x, y_<t)":
                -F.logsigmoid(beta * ((c - rc) / lc - (r - rr) / lr)).mean(),
            "beta multiplies the margin INSIDE the log sigmoid": -beta * F.logsigmoid((c - rc) - (r - rr)).mean(),
        }
    formula = "-mean log sigmoid(beta * ((log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))))"
    _grading.compare(got, want, wrong, formula)
    _grading.compare_grads(got_grads, want_grads)
    with _grading.quiet():
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(output_dir=_grading.trl_output_dir(), beta=beta, loss_type=["sigmoid"], report_to="none", use_cpu=True,
                         bf16=False, max_steps=1, per_device_train_batch_size=len(pairs), save_strategy="no",
                         disable_tqdm=True, gradient_checkpointing=False)
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tok,
                             train_dataset=data.to_trl_preference_dataset(pairs))
        trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
        trl_loss, trl_grads = _grading.loss_and_grads(trainer.compute_loss(trainer.model, trl_batch), trainer.model)
    _grading.compare(got, trl_loss, {}, formula, against="TRL DPOTrainer's")
    _grading.compare_grads(got_grads, trl_grads, against="TRL DPOTrainer's")


@exercise("ch07.predict_beta0", "Predict, then run: DPO with beta -> 0")
def check_predict_beta0(answer):
    _grading.prediction(answer, "b", ("a", "b", "c"),
                        "write the loss with beta = 0: -log sigmoid(0 * margin). What is it for every pair, and what is its "
                        "gradient? In DPO beta is not only the leash but also the reward's scale. Run the cell",
                        "(b): -log sigmoid(beta * m) -> log 2 for every pair and its gradient, -beta sigmoid(-beta m) "
                        "grad m, -> 0: the policy does not move (the package refuses beta <= 0 for that reason). In "
                        "chapter 06 beta = 0 removed the leash and the policy ran away; in DPO beta is also the scale "
                        "of the implicit reward beta log(pi / pi_ref), so a small beta needs a large log-ratio to "
                        "matter, and beta -> 0 removes the signal altogether.")
