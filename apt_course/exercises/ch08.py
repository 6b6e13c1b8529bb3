"""Chapter 08 exercises: log-odds of a sequence, the ORPO loss, the memory a trainer holds."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _grading, exercise, expect, expect_close


def _need_function(fn, name):
    expect(callable(fn), f"pass your function itself (e.g. `{name}`), not {type(fn).__name__}")


@exercise("ch08.log_odds", "log-odds of a sequence")
def check_log_odds(fn):
    _need_function(fn, "log_odds")
    avg = torch.tensor([-0.01, -0.6931, -2.0, -12.0], dtype=torch.float64)
    got = fn(avg.clone())
    expect(got is not None, "your log_odds returned None: did you forget `return`?")
    got = torch.as_tensor(got, dtype=torch.float64)
    want = avg - torch.log(1 - torch.exp(avg))
    expect(got.shape == avg.shape, f"one value per sequence: shape {tuple(avg.shape)}, got {tuple(got.shape)}")
    expect(not torch.allclose(got, avg), "that is log P itself: the odds are P / (1 - P)")
    expect(torch.allclose(got, want, rtol=1e-6, atol=1e-8), "log odds = log P - log(1 - P), with log P = avg_logp")


@exercise("ch08.orpo_loss", "the ORPO loss")
def check_orpo_loss(fn):
    _need_function(fn, "orpo_loss")
    avg_c, avg_r = torch.tensor([-0.2, -1.0, -3.0]), torch.tensor([-0.5, -0.8, -6.0])
    for beta in (0.1, 1.0):
        out = fn(torch.tensor(1.5), avg_c, avg_r, beta)
        expect(isinstance(out, torch.Tensor) and out.dim() == 0, "return a scalar torch tensor")
        lo = lambda a: a - torch.log(-torch.expm1(a))  # noqa: E731
        ratio = lo(avg_c) - lo(avg_r)
        want = 1.5 - beta * F.logsigmoid(ratio).mean()
        flipped = 1.5 + beta * F.logsigmoid(ratio).mean()
        expect(abs(out.item() - flipped.item()) > 1e-6, "the odds-ratio term has the wrong sign: the loss SUBTRACTS "
                                                        "lambda * log sigmoid(log odds ratio)")
        expect(abs(out.item() - want.item()) < 1e-5, f"wrong for beta = {beta}: L = nll - beta * mean log "
                                                      "sigmoid(log odds(y_w) - log odds(y_l))")


@exercise("ch08.training_bytes", "memory a trainer holds")
def check_training_bytes(fn):
    _need_function(fn, "training_bytes")
    n, b = 135_000_000, 4
    orpo = fn(n, b, False)
    dpo = fn(n, b, True)
    expect(orpo is not None and dpo is not None, "your training_bytes returned None: did you forget `return`?")
    expect(not math.isclose(float(orpo), 3 * n * b), "gradients are one copy of the weights too: weights + gradients "
                                                     "+ AdamW's two moments")
    expect_close(orpo, 4 * n * b, 1, "bytes for ORPO (no reference)")
    expect_close(dpo, 5 * n * b, 1, "bytes for DPO (a frozen reference: weights only, no gradients or moments)")


# ---------------------------------------------------------------- build: the ORPO training step, against TRL

@exercise("ch08.orpo_step", "The ORPO training step: NLL of the chosen answers minus beta log sigmoid(log odds ratio), "
                            "in one forward pass; with the NLL over the prompt too it is TRL's ORPOTrainer")
@_grading.own_rng
def check_orpo_step(fn):
    from .. import world
    from ..data import to_trl_preference_dataset
    from ..lm import build_pair_batch, completion_token_logprobs
    from ..orpo import log_odds_ratio, orpo_batch_loss

    _need_function(fn, "orpo_step")
    tok, beta = _grading.tokenizer(), 0.5
    pairs = world.preference_pairs(6, "train", seed=0)
    batch = build_pair_batch(tok, pairs)
    model = _grading.tiny_lm(seed=1)
    copy = lambda: {k: v.clone() for k, v in batch.items()}  # noqa: E731
    got, got_grads = _grading.loss_and_grads(fn(model, copy(), beta), model, "orpo_step")
    want, want_grads = _grading.loss_and_grads(orpo_batch_loss(model, batch, beta)[0], model, "orpo_batch_loss")
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_token, mask = completion_token_logprobs(logits, batch)
        every, _ = completion_token_logprobs(logits, batch, everywhere=True)
        mask = mask.float()
        total = (per_token * mask).sum(-1)
        avg_c, avg_r = (total / mask.sum(-1)).chunk(2)
        nll = -total.chunk(2)[0].sum() / mask.chunk(2)[0].sum()
        real = batch["attention_mask"][:, 1:].float().chunk(2)[0]
        nll_prompt = -(every.chunk(2)[0] * real).sum() / real.sum()
        nll_both = -total.sum() / mask.sum()
        or_term = -F.logsigmoid(log_odds_ratio(avg_c, avg_r)).mean()
        sum_c, sum_r = total.chunk(2)
        wrong = {
            "the NLL term is missing: ORPO is SFT on the chosen answers plus the odds-ratio term": beta * or_term,
            "the odds-ratio term has the wrong sign: the loss SUBTRACTS beta * log sigmoid(log odds ratio)":
                nll - beta * or_term,
            "that NLL covers the prompt tokens too: that is TRL's ORPOTrainer's form (nll_on_prompt=True); the "
            "chapter's (the paper's) takes the NLL over the chosen answer's tokens only": nll_prompt + beta * or_term,
            "that NLL covers the rejected answers too: ORPO's NLL is SFT on the CHOSEN answers only":
                nll_both + beta * or_term,
            "the odds use the summed log-prob of the whole answer: ORPO's P(y|x) is the length-normalised "
            "exp(mean_t log pi(y_t | ...))": nll - beta * F.logsigmoid(log_odds_ratio(sum_c, sum_r)).mean(),
            "that compares log-probabilities, not log-odds: log odds = log P - log(1 - P)":
                nll - beta * F.logsigmoid(avg_c - avg_r).mean(),
        }
    formula = "nll(chosen) - beta * mean log sigmoid(log odds(y_w) - log odds(y_l)), log P = mean token log-prob"
    _grading.compare(got, want, wrong, formula)
    _grading.compare_grads(got_grads, want_grads)
    # TRL's ORPOTrainer takes the NLL over the prompt too: the learner's step with nll_on_prompt=True must be it
    trl_got, trl_got_grads = _grading.loss_and_grads(fn(model, copy(), beta, nll_on_prompt=True), model,
                                                     "orpo_step(..., nll_on_prompt=True)")
    with _grading.quiet():
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        args = ORPOConfig(output_dir=_grading.trl_output_dir(), beta=beta, max_length=256, report_to="none", use_cpu=True, bf16=False,
                          remove_unused_columns=False,
                          per_device_train_batch_size=len(pairs), max_steps=1, save_strategy="no", disable_tqdm=True)
        trainer = ORPOTrainer(model=model, args=args, train_dataset=to_trl_preference_dataset(pairs, tok),
                              processing_class=tok)
        trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
        trl_loss, trl_grads = _grading.loss_and_grads(trainer.compute_loss(trainer.model, trl_batch), trainer.model)
    _grading.compare(trl_got, trl_loss, {"with nll_on_prompt=True your step still leaves the prompt out of the NLL: "
                                         "then it averages over every real token of the chosen rows (the "
                                         "attention mask), prompt and answer": float(want)},
                     "nll over the chosen rows' prompt and answer tokens, the odds-ratio term unchanged",
                     against="TRL ORPOTrainer's")
    _grading.compare_grads(trl_got_grads, trl_grads, against="TRL ORPOTrainer's")


@exercise("ch08.predict_lambda0", "Predict, then run: ORPO with its odds-ratio term dropped (beta = 0)")
def check_predict_lambda0(answer):
    _grading.prediction(answer, "b", ("a", "b", "c"),
                        "with beta = 0 only the NLL term is left: the mean negative log-likelihood of the chosen answers' "
                        "tokens. Which chapter's loss is that? Run the cell",
                        "(b): with beta = 0 the ORPO loss is the NLL of the chosen answers, chapter 04's completion-only "
                        "SFT loss on the demonstrations, to the last digit (the cell compares them on a batch; "
                        "tests/test_orpo.py checks it): ORPO is SFT plus a preference term, in one stage.")


@exercise("ch08.predict_no_nll", "Predict, then run: ORPO with its NLL term dropped")
def check_predict_no_nll(answer):
    _grading.prediction(answer, "b", ("a", "b", "c"),
                        "without the NLL term nothing asks the model to make the demonstrated answers likely: the odds-ratio "
                        "term only asks the chosen answer to beat the rejected one. Can that teach a base model to answer? "
                        "benchmarks/orpo_without_nll.py ran it",
                        "(b): with only the odds-ratio term, 100 steps from the base model left held-out task accuracy "
                        "at 0.000 at seeds 0-4 (full ORPO: 0.155-0.18), and the chosen answers' NLL rose from 1.5-3.3 "
                        "to 5.1-7.1 nats per token over the run (benchmarks/results/orpo_without_nll.md): the term "
                        "ranked chosen above rejected while both became less likely. The NLL half is what teaches "
                        "the answers.")
