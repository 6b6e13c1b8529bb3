"""Chapter 08: ORPO, odds-ratio preference optimisation: SFT and preference learning in one stage, no reference.

With P(y|x) = exp(mean_t log π(y_t | x, y_<t)) (the length-normalised likelihood) and odds(y|x) = P / (1 - P),

    L_ORPO = L_NLL(y_w) - β · mean log σ( log odds(y_w|x) - log odds(y_l|x) )

The NLL term is ordinary SFT on the chosen answers; the odds-ratio term pushes the rejected answer's odds
below the chosen one's. There is no reference model, so one model, one optimiser and one forward pass (chosen
and rejected rows together) per step. TRL's ``trl.experimental.orpo.ORPOTrainer`` computes the same loss
(its ``beta`` is the paper's λ); it takes the NLL over the prompt tokens too, which ``nll_on_prompt=True`` reproduces.

To compare ORPO with SFT → DPO on a real model on a CPU, :func:`trainable_copies` puts every model to train on one
copy of the weights, each its own LoRA adapter (:class:`AdapterView`), so DPO's frozen reference costs an adapter.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import validate_pairs
from .lm import build_pair_batch, completion_token_logprobs
from .training import make_optimizer, optimizer_step, progress


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, computed stably (Mächler's two branches around x = -log 2), with a value and
    gradient that stay finite and right all the way to x = 0.

    Each branch only ever sees inputs where it is stable: the other branch's inputs are swapped for a harmless
    constant *before* it runs. (``torch.where`` differentiates both branches; an infinite derivative in the
    unselected one, times 0, is NaN - the bug this guards against, e.g. log1p(-exp(-1e-9)) in float32.)
    At x = 0 the true value is -inf (a certain answer has infinite odds); x is clamped to the largest value
    below 0 of its dtype's normal range, -finfo.tiny (log 1.2e-38 ≈ -87 in float32), so it stays finite.
    """
    if torch.any(x > 0) or torch.any(torch.isnan(x)):
        raise ValueError("log1mexp needs x <= 0 (a log-probability), got a positive value or NaN")
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near_zero = x > -math.log(2)
    safe_near = torch.where(near_zero, x, torch.full_like(x, -1.0))  # the expm1 branch sees x in (-log 2, 0)
    safe_far = torch.where(near_zero, torch.full_like(x, -1.0), x)   # the log1p branch sees x <= -log 2
    return torch.where(near_zero, torch.log(-torch.expm1(safe_near)), torch.log1p(-torch.exp(safe_far)))


def log_odds_ratio(avg_c: torch.Tensor, avg_r: torch.Tensor) -> torch.Tensor:
    """log odds(y_w) - log odds(y_l),  log odds(y) = log P - log(1 - P),  log P = mean token log-prob."""
    return (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))


def orpo_loss(nll: torch.Tensor, avg_c: torch.Tensor, avg_r: torch.Tensor, beta: float):
    """L = nll - β · mean log σ(log odds ratio).  Returns ``(loss, or_term, log_odds)``, or_term = -mean log σ(.).

    β is the paper's λ (TRL's name, ``ORPOConfig.beta``)."""
    if not beta >= 0:
        raise ValueError(f"beta (the weight of the odds-ratio term, the paper's λ) must be >= 0, got {beta!r}")
    log_odds = log_odds_ratio(avg_c.float(), avg_r.float())
    or_term = -F.logsigmoid(log_odds).mean()
    return nll + beta * or_term, or_term.detach(), log_odds.detach()


def orpo_batch_loss(model, batch: dict[str, torch.Tensor], beta: float, nll_on_prompt: bool = False):
    """ORPO on a pair batch (chosen rows, then rejected rows): one forward pass for both halves."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    per_token, mask = completion_token_logprobs(logits, batch, everywhere=nll_on_prompt)
    mask = mask.float()
    avg = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    avg_c, avg_r = avg.chunk(2)
    nll_mask = (batch["attention_mask"][:, 1:].float() if nll_on_prompt else mask).chunk(2)[0]
    nll = -(per_token.chunk(2)[0] * nll_mask).sum() / nll_mask.sum()
    loss, or_term, log_odds = orpo_loss(nll, avg_c, avg_r, beta)
    stats = {"nll": nll.item(), "or_loss": or_term.item(), "log_odds": log_odds.mean().item(),
             "logp_chosen": avg_c.mean().item(), "logp_rejected": avg_r.mean().item(),
             "reward_acc": (avg_c > avg_r).float().mean().item()}
    return loss, stats


@dataclass
class ORPOConfig:
    """Settings of :func:`train_orpo` (the from-scratch twin of ``trl.experimental.orpo.ORPOConfig``).

    beta: the weight of the odds-ratio term (the paper's λ; TRL's name; the paper uses 0.1 to 1);
    steps, batch_size (pairs per step), lr, warmup, weight_decay: AdamW with warm-up then cosine
    (an SFT-sized learning rate, since ORPO does the SFT too); nll_on_prompt: take the NLL over prompt and
    answer as TRL does (default: the answer only, as in the paper); seed: batch order; log_every.
    """

    beta: float = 0.5
    steps: int = 300
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.0
    nll_on_prompt: bool = False
    seed: int = 0
    log_every: int = 10

    def __post_init__(self):
        if not self.beta >= 0:
            raise ValueError(f"beta must be >= 0, got {self.beta!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")


def train_orpo(model, tokenizer, pairs: list[dict], config: ORPOConfig = ORPOConfig()) -> dict:
    """One-stage ORPO on preference pairs. Returns the history: step, loss, nll, or_loss, log_odds,
    logp_chosen / logp_rejected (mean token log-probs), reward_acc, seconds."""
    validate_pairs(pairs)
    device = next(model.parameters()).device
    rng = random.Random(config.seed)
    opt, sched = make_optimizer(model, config.lr, config.steps, config.warmup, config.weight_decay)
    keys = ("nll", "or_loss", "log_odds", "logp_chosen", "logp_rejected", "reward_acc")
    history = {"step": [], "loss": [], **{k: [] for k in keys}, "seconds": 0.0}
    start = time.perf_counter()
    model.train()
    for step in progress(range(config.steps), "ORPO"):
        idx = rng.sample(range(len(pairs)), min(config.batch_size, len(pairs)))
        batch = build_pair_batch(tokenizer, [pairs[i] for i in idx], device)
        loss, stats = orpo_batch_loss(model, batch, config.beta, config.nll_on_prompt)
        loss_value = optimizer_step(loss, model, opt, sched, max_grad_norm=1.0)
        if step % config.log_every == 0 or step == config.steps - 1:
            history["step"].append(step)
            history["loss"].append(loss_value)
            for k in keys:
                history[k].append(stats[k])
    history["seconds"] = time.perf_counter() - start
    model.eval()
    return history


def training_state_bytes(model, optimizer_states: int = 2, reference=None) -> dict:
    """Memory a trainer holds besides activations, from counts: weights + gradients + AdamW's
    ``optimizer_states`` tensors per weight (+ a frozen reference's weights, those it does not share with
    ``model``: a separate copy costs all of its weights, a LoRA reference (:class:`AdapterView`) only its
    adapter). Bytes per element from dtypes."""
    params = [p for p in model.parameters()]
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    shared = {id(p) for p in params}
    ref = sum(p.numel() * p.element_size() for p in reference.parameters() if id(p) not in shared) \
        if reference is not None else 0
    out = {"weights": weights, "gradients": trainable, "optimizer": optimizer_states * trainable, "reference": ref}
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------- several models on one copy of the weights (LoRA)

class AdapterView(torch.nn.Module):
    """One model of several that share a PEFT model's weights: ``peft_model`` with only its LoRA adapter
    ``adapter`` on, or with every adapter off (``adapter=None``: the model the adapters were added to).

    It holds no weights of its own, so a second policy or a frozen reference costs an adapter, not a copy of the
    model. Its forward pass and ``generate`` switch its adapter on for the call and switch back after;
    ``parameters()`` are the shared frozen weights and its own adapter, so the course's trainers
    (``train_orpo``, ``train_sft``, ``train_dpo``'s policy or reference) take it as they take a model.
    Every adapter stays trainable (``requires_grad``); only the one switched on receives gradients.
    """

    def __init__(self, peft_model, adapter: str | None = None):
        super().__init__()
        if adapter is not None and adapter not in peft_model.peft_config:
            raise ValueError(f"no adapter {adapter!r}; the model has {sorted(peft_model.peft_config)}")
        object.__setattr__(self, "peft_model", peft_model)  # not a submodule: the view registers no weights
        self.adapter = adapter
        self.training = peft_model.training

    def _lora_parameters(self):
        return [p for n, p in self.peft_model.named_parameters() if "lora_" in n]

    @contextlib.contextmanager
    def active(self):
        """Inside: ``peft_model`` computes as this view's model (its adapter on, the others off)."""
        pm = self.peft_model
        flags = [(p, p.requires_grad) for p in self._lora_parameters()]  # PEFT's switches reset them
        try:
            if self.adapter is None:
                with pm.disable_adapter():
                    yield pm
            elif pm.active_adapters == [self.adapter]:
                yield pm
            else:
                previous = pm.active_adapters[0]
                pm.set_adapter(self.adapter)
                try:
                    yield pm
                finally:
                    pm.set_adapter(previous)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def forward(self, *args, **kwargs):
        with self.active() as pm:
            return pm(*args, **kwargs)

    def generate(self, *args, **kwargs):
        with self.active() as pm:
            return pm.generate(*args, **kwargs)

    def get_input_embeddings(self):
        return self.peft_model.get_input_embeddings()

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        for name, p in self.peft_model.named_parameters(prefix=prefix, remove_duplicate=remove_duplicate):
            if "lora_" not in name or (self.adapter is not None and f".{self.adapter}." in name):
                yield name, p

    def parameters(self, recurse: bool = True):
        for _, p in self.named_parameters():
            yield p

    def train(self, mode: bool = True):
        self.training = mode
        self.peft_model.train(mode)
        return self

    def __repr__(self):
        return f"AdapterView({type(self.peft_model).__name__}, adapter={self.adapter!r})"


def trainable_copies(model, names, lora_rank: int = 0, seed: int = 0,
                     target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> dict:
    """The models of a comparison, each starting as ``model``: ``{name: model to train}`` for every name, and
    ``None``: the starting model itself, kept unchanged.

    ``lora_rank=0``: deep copies, every weight trains. ``lora_rank=r``: one LoRA adapter of rank r (alpha = 2r,
    B = 0 at start, so every copy computes exactly as ``model``) per name on one copy of the weights, each an
    :class:`AdapterView`; ``None`` is the view with every adapter off. ``model`` is wrapped in place then:
    use the returned ``None`` entry, not ``model``, as the starting model.
    """
    if not lora_rank:
        return {None: model, **{name: copy.deepcopy(model) for name in names}}
    from peft import LoraConfig, get_peft_model

    def config():
        return LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                          target_modules=list(target_modules), task_type="CAUSAL_LM")

    names = list(names)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config(), adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config())
    for n, p in peft_model.named_parameters():  # every adapter trainable; the views switch which one computes
        p.requires_grad_("lora_" in n)
    return {None: AdapterView(peft_model, None), **{name: AdapterView(peft_model, name) for name in names}}


def copy_weights(source, target):
    """Make ``target`` start where ``source`` ended (the DPO stage from the SFT model): their weights, or for two
    :class:`AdapterView` of one PEFT model, ``source``'s adapter into ``target``'s. Returns ``target``."""
    if isinstance(source, AdapterView) != isinstance(target, AdapterView):
        raise TypeError("copy_weights needs two models or two AdapterViews of one PEFT model")
    with torch.no_grad():
        if not isinstance(source, AdapterView):
            target.load_state_dict(source.state_dict())
            return target
        if source.peft_model is not target.peft_model or None in (source.adapter, target.adapter):
            raise ValueError("copy_weights copies one adapter of a PEFT model into another of the same model")
        params = dict(source.peft_model.named_parameters())
        src_tag, dst_tag = f".{source.adapter}.", f".{target.adapter}."
        copied = 0
        for name, p in params.items():
            if "lora_" in name and src_tag in name:
                params[name.replace(src_tag, dst_tag)].copy_(p)
                copied += 1
        if not copied:
            raise ValueError(f"adapter {source.adapter!r} has no LoRA weights to copy")
    return target
