"""Chapter 07: offline preference optimisation, DPO and its family, as losses on log-probabilities.

Notation: for a prompt x with a preferred answer y_w ("chosen") and a dispreferred one y_l ("rejected"),
``log π(y|x)`` is the completion's summed token log-probability under the policy being trained and
``log π_ref(y|x)`` the same under the frozen reference (the SFT model). The *implicit reward* is

    r(x, y) = β · (log π(y|x) - log π_ref(y|x))

and every loss below is a function of these numbers only (:func:`dpo_loss`, :func:`ipo_loss`,
:func:`simpo_loss`, :func:`kto_loss`). :func:`train_dpo` is the from-scratch loop for all four; the
batch layout (chosen rows, then rejected rows) is the one TRL's ``DataCollatorForPreference`` builds, so a
TRL batch can be fed to :func:`pair_batch_logps` unchanged (the parity tests do this).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import to_trl_preference_dataset, validate_pairs
from .lm import build_batch, build_pair_batch, completion_lengths, completion_logprobs, generate
from .tokenizer import format_prompt
from .training import make_optimizer, optimizer_step, progress
from .world import score_reply

LOSS_TYPES = ("sigmoid", "ipo", "simpo", "kto")


# ---------------------------------------------------------------- the losses (one screen)

def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0 (the strength of the KL leash / the reward scale), got {beta!r}")


def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta: float):
    """DPO (sigmoid):  L = -mean log σ(β [(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]).

    Returns ``(loss, chosen_rewards, rejected_rewards)``; the rewards are β·log(π/π_ref), detached.
    """
    _check_beta(beta)
    chosen, rejected = pi_c - ref_c, pi_r - ref_r
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return loss, beta * chosen.detach(), beta * rejected.detach()


def ipo_loss(pi_c, pi_r, ref_c, ref_r, beta: float, len_c=None, len_r=None):
    """IPO:  L = mean (h - 1/(2β))²,  h = (log π(y_w) - log π_ref(y_w))/|y_w| - (log π(y_l) - log π_ref(y_l))/|y_l|.

    A squared loss pulls the log-ratio margin to the finite target 1/(2β) instead of pushing it to infinity.
    The lengths |y| (token counts) normalise as TRL 1.x does; ``len_c = len_r = None`` gives the paper's form.
    """
    _check_beta(beta)
    chosen, rejected = pi_c - ref_c, pi_r - ref_r
    h = chosen / (1 if len_c is None else len_c) - rejected / (1 if len_r is None else len_r)
    return ((h - 1 / (2 * beta)) ** 2).mean(), beta * chosen.detach(), beta * rejected.detach()


def simpo_loss(avg_c, avg_r, beta: float, gamma: float):
    """SimPO:  L = -mean log σ(β (avg log π(y_w) - avg log π(y_l)) - γ),  no reference model.

    ``avg`` = the completion's log-probability divided by its token count; γ ≥ 0 is the target margin.
    The rewards reported are β·avg log π(y).
    """
    _check_beta(beta)
    loss = -F.logsigmoid(beta * (avg_c - avg_r) - gamma).mean()
    return loss, beta * avg_c.detach(), beta * avg_r.detach()


def kto_loss(pi, ref, desirable, kl, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO on unpaired examples (x, y, desirable?):  r = log π(y|x) - log π_ref(y|x),  z0 = kl (detached, ≥ 0),

        L = mean over the batch of  λ_D (1 - σ(β (r - z0)))  for desirable y,  λ_U (1 - σ(β (z0 - r)))  otherwise.

    ``kl`` estimates KL(π || π_ref) from mismatched pairs (see :func:`kto_kl`). Returns
    ``(loss, desirable_rewards, undesirable_rewards)``.
    """
    _check_beta(beta)
    desirable = torch.as_tensor(desirable, dtype=torch.bool, device=pi.device)
    r = pi - ref
    z0 = torch.as_tensor(kl, dtype=r.dtype, device=r.device).detach().clamp(min=0)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    return losses.mean(), beta * r[desirable].detach(), beta * r[~desirable].detach()


def kto_kl(pi_mismatched, ref_mismatched):
    """KTO's reference point z0 = max(0, mean(log π(y'|x) - log π_ref(y'|x))) over mismatched (x, y'), detached."""
    return (pi_mismatched - ref_mismatched).mean().detach().clamp(min=0)


# ---------------------------------------------------------------- pair batches

def pair_batch_logps(model, batch):
    """Split a pair batch's (chosen rows, then rejected rows) summed completion log-probs and completion
    lengths into ``(chosen, rejected, len_chosen, len_rejected)``."""
    logps, lengths = completion_logprobs(model, batch, "sum"), completion_lengths(batch)
    (c, r), (lc, lr) = logps.chunk(2), lengths.chunk(2)
    return c, r, lc, lr


def pair_loss(policy, ref, batch, loss_type: str = "sigmoid", beta: float = 0.1, simpo_gamma: float = 0.5,
              sft_weight: float = 0.0):
    """The loss of one pair batch for ``loss_type`` in sigmoid/ipo/simpo; also returns a dict of statistics.

    ``sft_weight`` = α adds α · NLL(y_w), the mean token NLL of the chosen answers (RPO; in TRL
    ``loss_type=[..., "sft"]``, ``loss_weights=[1, α]``): it stops the chosen answer's likelihood from falling.
    """
    c, r, lc, lr = pair_batch_logps(policy, batch)
    if loss_type == "simpo":
        loss, rc, rr = simpo_loss(c / lc, r / lr, beta, simpo_gamma)
    else:
        if ref is None:
            raise ValueError(f"loss_type {loss_type!r} needs a reference model (only 'simpo' works without one)")
        with torch.no_grad():
            ref_c, ref_r, _, _ = pair_batch_logps(ref, batch)
        if loss_type == "sigmoid":
            loss, rc, rr = dpo_loss(c, r, ref_c, ref_r, beta)
        elif loss_type == "ipo":
            loss, rc, rr = ipo_loss(c, r, ref_c, ref_r, beta, lc, lr)
        else:
            raise ValueError(f"unknown loss_type {loss_type!r} for pairs; use one of sigmoid, ipo, simpo")
    if sft_weight:
        loss = loss + sft_weight * (-c.sum() / lc.sum())
    stats = {"reward_chosen": rc.mean().item(), "reward_rejected": rr.mean().item(),
             "margin": (rc - rr).mean().item(), "reward_acc": (rc > rr).float().mean().item(),
             "logp_chosen": c.mean().item(), "logp_rejected": r.mean().item()}
    return loss, stats


def to_unpaired(pairs: list[dict]) -> list[dict]:
    """Pairs -> KTO's unpaired rows ``{"prompt", "completion", "label"}``: chosen True, rejected False."""
    validate_pairs(pairs)
    out = []
    for p in pairs:
        extra = {"system": p["system"]} if p.get("system") else {}
        out.append({"prompt": p["prompt"], "completion": p["chosen"], "label": True, **extra})
        out.append({"prompt": p["prompt"], "completion": p["rejected"], "label": False, **extra})
    return out


def kto_batch_loss(policy, ref, tokenizer, rows: list[dict], beta: float, desirable_weight: float = 1.0,
                   undesirable_weight: float = 1.0, device="cpu"):
    """KTO on a batch of unpaired rows; the KL completions are the batch's completions rotated by one
    (row i is scored with row i-1's completion), as TRL's ``KTOTrainer`` builds them."""
    if ref is None:
        raise ValueError("KTO needs a reference model")
    prompts = [format_prompt(tokenizer, x["prompt"], x.get("system")) for x in rows]
    comps = [x["completion"] for x in rows]
    batch = build_batch(tokenizer, prompts, comps, device=device)
    kl_batch = build_batch(tokenizer, prompts, comps[-1:] + comps[:-1], device=device)
    pi = completion_logprobs(policy, batch, "sum")
    with torch.no_grad():
        ref_lp = completion_logprobs(ref, batch, "sum")
        kl = kto_kl(completion_logprobs(policy, kl_batch, "sum"), completion_logprobs(ref, kl_batch, "sum"))
    labels = [bool(x["label"]) for x in rows]
    loss, rd, ru = kto_loss(pi, ref_lp, labels, kl, beta, desirable_weight, undesirable_weight)
    mask = torch.tensor(labels, device=pi.device)
    nan = float("nan")
    stats = {"reward_chosen": rd.mean().item() if len(rd) else nan,
             "reward_rejected": ru.mean().item() if len(ru) else nan,
             "kl": kl.item(), "logp_chosen": pi[mask].mean().item() if mask.any() else nan,
             "logp_rejected": pi[~mask].mean().item() if (~mask).any() else nan}
    stats["margin"] = stats["reward_chosen"] - stats["reward_rejected"]
    return loss, stats


# ---------------------------------------------------------------- the trainer

@dataclass
class DPOConfig:
    """Settings of :func:`train_dpo` (the from-scratch twin of ``trl.DPOConfig``: import one of the two by module,
    ``dpo.DPOConfig`` or ``trl.DPOConfig``, where both are used).

    loss_type: "sigmoid" (DPO), "ipo", "simpo" (no reference model) or "kto" (pairs are split into unpaired
    desirable/undesirable rows); beta: β of the loss (IPO's τ; SimPO's reward scale); simpo_gamma: SimPO's
    margin γ; sft_weight: α of an added NLL term on the chosen answers (0 = plain loss; see :func:`pair_loss`);
    steps, batch_size (pairs per step; KTO draws 2x rows), lr, warmup, weight_decay: the optimiser
    (AdamW, warm-up then cosine); desirable_weight / undesirable_weight: KTO's λ_D, λ_U; seed: batch order;
    log_every: how often the history records.
    """

    loss_type: str = "sigmoid"
    beta: float = 0.1
    simpo_gamma: float = 0.5
    sft_weight: float = 0.0
    steps: int = 120
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 10
    weight_decay: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    seed: int = 0
    log_every: int = 5

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        _check_beta(self.beta)
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")


def check_reference(policy, ref, tokenizer=None, ref_tokenizer=None) -> None:
    """A reference model must be a separate copy over the same vocabulary (the log-ratio compares the
    same token ids under both models)."""
    if ref is None:
        return
    if ref is policy:
        raise ValueError("ref is the policy itself: pass a frozen copy (e.g. load the checkpoint twice)")
    v_pol, v_ref = policy.get_input_embeddings().num_embeddings, ref.get_input_embeddings().num_embeddings
    if v_pol != v_ref:
        raise ValueError(f"the reference model's vocabulary has {v_ref} tokens but the policy's has {v_pol}: "
                         "log π/π_ref needs one tokenizer for both; load the reference from the policy's checkpoint")
    if tokenizer is not None and ref_tokenizer is not None and tokenizer.get_vocab() != ref_tokenizer.get_vocab():
        raise ValueError("the reference model's tokenizer differs from the policy's (different vocab): the same text "
                         "would become different token ids; use the policy's tokenizer and checkpoint for both")


def train_dpo(policy, ref, tokenizer, pairs: list[dict], config: DPOConfig = DPOConfig(),
              ref_tokenizer=None) -> dict:
    """Train ``policy`` on preference ``pairs`` with ``config.loss_type``; ``ref`` stays frozen (None for SimPO).

    Returns the history: step, loss, reward_chosen, reward_rejected (β·log π/π_ref, batch means), margin,
    reward_acc (chosen reward > rejected), logp_chosen, logp_rejected (log π, summed), seconds.
    """
    validate_pairs(pairs)
    check_reference(policy, ref, tokenizer, ref_tokenizer)
    if ref is None and config.loss_type != "simpo":
        raise ValueError(f"loss_type {config.loss_type!r} needs a reference model; pass the SFT model as ref")
    if ref is not None:
        ref.eval()  # its log-probs are computed under no_grad; its parameters are left as they are
    device = next(policy.parameters()).device
    rows = to_unpaired(pairs) if config.loss_type == "kto" else pairs
    per_step = config.batch_size * (2 if config.loss_type == "kto" else 1)
    rng = random.Random(config.seed)
    opt, sched = make_optimizer(policy, config.lr, config.steps, config.warmup, config.weight_decay)
    keys = ("loss", "reward_chosen", "reward_rejected", "margin", "reward_acc", "logp_chosen", "logp_rejected")
    history = {"step": [], **{k: [] for k in keys}, "seconds": 0.0}
    start = time.perf_counter()
    policy.train()
    for step in progress(range(config.steps), f"preference ({config.loss_type})"):
        idx = rng.sample(range(len(rows)), min(per_step, len(rows)))
        batch_rows = [rows[i] for i in idx]
        if config.loss_type == "kto":
            loss, stats = kto_batch_loss(policy, ref, tokenizer, batch_rows, config.beta, config.desirable_weight,
                                         config.undesirable_weight, device)
            stats["reward_acc"] = float("nan")  # unpaired: no chosen/rejected of the same prompt in a batch
        else:
            batch = build_pair_batch(tokenizer, batch_rows, device)
            loss, stats = pair_loss(policy, ref, batch, config.loss_type, config.beta, config.simpo_gamma,
                                    config.sft_weight)
        loss_value = optimizer_step(loss, policy, opt, sched, max_grad_norm=1.0)
        if step % config.log_every == 0 or step == config.steps - 1:
            history["step"].append(step)
            history["loss"].append(loss_value)
            for k in keys[1:]:
                history[k].append(stats[k])
    history["seconds"] = time.perf_counter() - start
    policy.eval()
    return history


# ---------------------------------------------------------------- the same pairs through TRL

def make_trl_dpo_trainer(policy, ref, tokenizer, pairs: list[dict], beta: float, lr: float, batch_size: int,
                         steps: int, seed: int = 0, logging_steps: int = 2, output_dir: str | None = None,
                         explicit_prompts: bool = False, **config_overrides):
    """TRL's ``DPOTrainer`` on the same pairs as :func:`train_dpo` (conversational: TRL applies the chat template;
    ``explicit_prompts``: prompt strings already formatted, as the pipeline's data is), sigmoid loss, cosine
    schedule, float32, quiet (its printer callback removed): the library twin that the notebooks train and check
    against :func:`pair_loss` on one batch (``training.trl_loss_on_batch``). ``config_overrides`` are further
    ``trl.DPOConfig`` fields, winning over these (the pipeline's ``loss_type=["sigmoid", "sft"]``, ``bf16``, ...)."""
    import trl
    from transformers import PrinterCallback

    settings = dict(output_dir=output_dir or os.path.join(tempfile.gettempdir(), "apt_course_trl_dpo"),
                    beta=beta, learning_rate=lr, per_device_train_batch_size=batch_size, max_steps=steps,
                    lr_scheduler_type="cosine", report_to="none",
                    use_cpu=next(policy.parameters()).device.type == "cpu", bf16=False,
                    gradient_checkpointing=False, save_strategy="no", logging_steps=logging_steps,
                    disable_tqdm=True, seed=seed)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=trl.DPOConfig(**(settings | config_overrides)),
                             processing_class=tokenizer,
                             train_dataset=to_trl_preference_dataset(pairs, tokenizer if explicit_prompts else None))
    trainer.remove_callback(PrinterCallback)  # its log lines would fill a notebook
    return trainer


# ---------------------------------------------------------------- measuring

@torch.no_grad()
def pair_scores(model, tokenizer, pairs: list[dict], batch_size: int | None = None):
    """Summed log-probs and lengths of every pair's chosen and rejected completion: four 1-D tensors.

    ``batch_size`` pairs per forward pass (default: 128 for a small vocabulary, 4 for a real model, whose
    full-vocabulary log-softmax is large)."""
    validate_pairs(pairs)
    if batch_size is None:
        batch_size = 128 if model.get_input_embeddings().num_embeddings <= 1024 else 4
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = [[], [], [], []]
    for i in range(0, len(pairs), batch_size):
        for acc, t in zip(out, pair_batch_logps(model, build_pair_batch(tokenizer, pairs[i:i + batch_size], device))):
            acc.append(t.cpu())
    model.train(was_training)
    return tuple(torch.cat(x) for x in out)


def ranking_accuracy(scores, ref_scores=None, normalize: bool = False) -> float:
    """Fraction of pairs ranked right, from :func:`pair_scores`' ``(chosen, rejected, len_chosen, len_rejected)``
    (score a model once, rank as many ways as needed: a real model's forward pass over the test set costs a
    minute on a CPU).

    With ``ref_scores``: the implicit reward, log π(y_w)/π_ref(y_w) > log π(y_l)/π_ref(y_l) (what DPO trains).
    Without: the model's own log-probabilities, log π(y_w) > log π(y_l) (per token with ``normalize``).
    """
    c, r, lc, lr = scores
    if ref_scores is not None:
        c, r = c - ref_scores[0], r - ref_scores[1]
    elif normalize:
        c, r = c / lc, r / lr
    return (c > r).double().mean().item()  # float64: 132/150 is 0.88, not 0.8799999


def implicit_reward_accuracy(model, tokenizer, pairs: list[dict], ref=None, normalize: bool = False) -> float:
    """Fraction of pairs the policy ranks right (TRL logs it as ``rewards/accuracies``):
    :func:`ranking_accuracy` of the policy's :func:`pair_scores` (and the reference's, with ``ref``)."""
    ref_scores = pair_scores(ref, tokenizer, pairs) if ref is not None else None
    return ranking_accuracy(pair_scores(model, tokenizer, pairs), ref_scores, normalize)


def win_rate(model_a, model_b, tokenizer, pairs: list[dict], max_new_tokens: int = 40) -> dict:
    """Greedy replies of A and B to each pair's prompt, scored by :func:`score_reply`.

    A wins a prompt when its score is higher, loses when lower, ties when equal.
    ``win_rate`` = (wins + ties/2) / prompts: 0.5 means no difference, 1.0 that A wins everywhere.
    """
    prompts = [format_prompt(tokenizer, p["prompt"], p.get("system")) for p in pairs]
    a = generate(model_a, tokenizer, prompts, max_new_tokens=max_new_tokens)
    b = generate(model_b, tokenizer, prompts, max_new_tokens=max_new_tokens)
    sa = [score_reply(p, x) for p, x in zip(pairs, a)]
    sb = [score_reply(p, x) for p, x in zip(pairs, b)]
    wins = sum(x > y for x, y in zip(sa, sb))
    losses = sum(x < y for x, y in zip(sa, sb))
    ties = len(pairs) - wins - losses
    return {"wins": wins, "ties": ties, "losses": losses, "win_rate": (wins + ties / 2) / len(pairs),
            "score_a": sum(sa) / len(sa), "score_b": sum(sb) / len(sb), "replies_a": a, "replies_b": b}
