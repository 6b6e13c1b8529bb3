"""Chapter 14: making a model small and fast - distillation, quantisation, pruning, and memory while training.

* **Distillation** (:func:`kd_loss`, :func:`generalized_jsd`, :func:`make_student`, :func:`train_distill`): a
  smaller student learns from the teacher's full next-token distributions, not only from the data's tokens.
  Logit KD (Hinton et al., 2015) at temperature T::

      L_KD = T² · (1/N) Σ_t KL( softmax(z_teacher,t / T) || softmax(z_student,t / T) )

  The T² keeps the gradient's size independent of T (the soft targets' gradients shrink as 1/T²).
  On-policy distillation (generalised KD, Agarwal et al., 2024; TRL's ``GKDTrainer``): with probability λ the
  student *samples* the completion and the teacher scores each of its tokens, so the student learns on the
  prefixes it will meet at inference; the divergence is the generalised Jensen-Shannon one (β = 0: forward KL,
  β = 1: reverse KL).
* **Quantisation**: int8 dynamic post-training quantisation with PyTorch's own API
  (:func:`quantize_int8_dynamic`, optionally keeping the layers whose inputs have extreme outliers in float:
  :func:`activation_outliers`; :func:`float32_copy` is the float32 baseline it is timed against); 4-bit
  weight-only group-wise quantisation from scratch (:func:`quantize_groupwise` / :func:`dequantize_groupwise`,
  :class:`QuantLinear`, :func:`quantize_model`; :func:`dequantize_model` computes the same numbers faster)::

      min = min(w.min(), 0),  max = max(w.max(), 0)            (the range is first stretched to hold 0, as GPTQ does)
      scale = (max - min) / (2^b - 1),  zero = round(-min / scale),  q = clamp(round(w / scale) + zero, 0, 2^b - 1)
      ŵ = (q - zero) · scale                                   (one scale and zero point per group of g weights)

  and quantisation-aware training (:func:`prepare_qat`): the forward pass uses ŵ, the backward pass treats the
  rounding as the identity (the straight-through estimator), ``w + (ŵ - w).detach()``.
* **Pruning**: unstructured magnitude pruning (:func:`magnitude_prune`, zero the smallest |w| of each matrix) and
  structured pruning of attention heads (:func:`prune_heads`, remove whole heads so the matrices shrink).
* **Measuring**: :class:`HeldOut` (held-out loss and KL to the teacher from one forward pass),
  :func:`count_weights` and :func:`state_bytes` (weights represented, bytes of the saved state),
  :func:`measure_latency` (seconds per generated token of several models, interleaved in one run),
  :func:`checkpointing_trade` (gradient checkpointing's memory and time on one training step).

Bad input is a clear ``ValueError``: an unsupported bit width or group size (:func:`check_quant_args`), a sparsity
outside [0, 1) (:func:`check_sparsity`), a student as big as its teacher (:func:`make_student`,
:func:`check_student`).
"""

from __future__ import annotations

import copy
import io
import math
import random
import statistics
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lm import build_batch, completion_loss, sample_groups
from .model import count_parameters
from .sft import to_sft_pairs
from .tokenizer import format_prompt
from .training import make_optimizer, optimizer_step, progress

SUPPORTED_BITS = (2, 4, 8)  # widths that pack whole codes into bytes

# ---------------------------------------------------------------- distillation: the losses


def _masked_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
            temperature: float = 1.0) -> torch.Tensor:
    """Hinton's logit distillation: T² · mean over masked positions of KL(p_T || q_T), where
    p_T = softmax(teacher_logits / T) and q_T = softmax(student_logits / T) over the vocabulary (last axis).

    The soft targets' gradient with respect to the student's logits is (q_T - p_T) / T, and a softmax at high T
    is nearly flat, so the KL itself shrinks as 1/T²; multiplying by T² keeps the loss (and the learning rate
    that suits it) comparable across temperatures. ``mask`` (same shape as the logits without the vocabulary
    axis) selects the positions that count, e.g. the completion's tokens."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: distillation needs the same positions and vocabulary")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = _kl_terms(log_p, log_q).sum(-1)
    return temperature ** 2 * _masked_mean(kl, mask)


def _kl_terms(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """a · (log a - log b) per vocabulary entry, with 0 · log 0 = 0: a token the first distribution gives no mass
    (a -inf logit, e.g. a masked-out token) adds nothing, instead of the NaN of 0 · (-inf)."""
    a = log_a.exp()
    keep = a > 0  # masked inside, so no NaN reaches the gradient either (the double-where pattern)
    return a * (log_a.masked_fill(~keep, 0.0) - log_b.masked_fill(~keep, 0.0))


def generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None,
                    beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """The generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024, eq. 1), per token, averaged over
    masked positions. With m = β p + (1 - β) q (p the teacher's, q the student's distribution at ``temperature``)::

        JSD_β = β · KL(p || m) + (1 - β) · KL(q || m);   β = 0: KL(p || q) (forward);  β = 1: KL(q || p) (reverse)

    (the two ends are the limits without the 1/β scale; TRL's ``GKDTrainer.generalized_jsd_loss`` uses the same
    convention)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta interpolates forward (0) and reverse (1) KL: it must be in [0, 1], got {beta!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0:
        div = _kl_terms(log_p, log_q).sum(-1)
    elif beta == 1:
        div = _kl_terms(log_q, log_p).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
        div = beta * _kl_terms(log_p, log_m).sum(-1) + (1 - beta) * _kl_terms(log_q, log_m).sum(-1)
    return _masked_mean(div, mask)


# ---------------------------------------------------------------- distillation: the student


def make_student(teacher, layers: int | None = None, hidden_size: int | None = None,
                 intermediate_size: int | None = None, seed: int = 0, keep: list[int] | None = None):
    """A smaller Llama with the teacher's vocabulary.

    Same width (``hidden_size`` None or the teacher's): ``layers`` of the teacher's layers, evenly spaced and
    copied with the embeddings and final norm (DistilBERT's and Minitron's start: a student that already half
    works), or exactly the teacher layers listed in ``keep`` (in order; e.g. all but a contiguous block, which
    breaks a deep model less than removing every other layer: Gromov et al., 2024). Narrower: a fresh random
    initialisation (nothing of the teacher's fits its shapes). A student as big as the teacher or bigger is
    refused."""
    from transformers import AutoModelForCausalLM

    cfg = teacher.config
    n_teacher = cfg.num_hidden_layers
    if keep is not None:
        keep = [int(i) for i in keep]
        if not keep or any(not 0 <= i < n_teacher for i in keep) or len(set(keep)) != len(keep):
            raise ValueError(f"keep lists distinct teacher layers in 0..{n_teacher - 1}, got {keep}")
        if layers is not None and layers != len(keep):
            raise ValueError(f"layers={layers} but keep lists {len(keep)} layers: pass one or the other")
        if hidden_size not in (None, cfg.hidden_size) or intermediate_size not in (None, cfg.intermediate_size):
            raise ValueError("keep copies the teacher's layers: the student must have the teacher's width")
        layers = len(keep)
    if layers is None:
        raise ValueError("pass layers (how many, evenly spaced) or keep (which teacher layers)")
    hidden = cfg.hidden_size if hidden_size is None else hidden_size
    inter = cfg.intermediate_size if intermediate_size is None else intermediate_size
    if not 1 <= layers <= n_teacher:
        raise ValueError(f"the student needs 1 to {n_teacher} layers (the teacher has {n_teacher}), got {layers}: "
                         "a student is the same size as its teacher or smaller")
    if hidden > cfg.hidden_size or inter > cfg.intermediate_size:
        raise ValueError(f"the student's width ({hidden}, MLP {inter}) exceeds the teacher's ({cfg.hidden_size}, MLP "
                         f"{cfg.intermediate_size}): pass a hidden_size/intermediate_size no larger than the teacher's")
    if layers == n_teacher and hidden == cfg.hidden_size and inter == cfg.intermediate_size:
        raise ValueError("that student is the teacher's exact size: use fewer layers or a smaller hidden_size")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    new = copy.deepcopy(cfg)
    new.num_hidden_layers = layers
    if getattr(new, "layer_types", None) is not None:
        new.layer_types = list(new.layer_types)[:layers]
    if hidden != cfg.hidden_size or inter != cfg.intermediate_size:
        if hidden % head_dim:
            raise ValueError(f"hidden_size {hidden} must be a multiple of the head size {head_dim}")
        heads = hidden // head_dim
        kv = math.gcd(heads, cfg.num_key_value_heads)
        new.hidden_size, new.intermediate_size = hidden, inter
        new.num_attention_heads, new.num_key_value_heads, new.head_dim = heads, kv, head_dim
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(new)
    else:
        torch.manual_seed(seed)
        student = AutoModelForCausalLM.from_config(new)
        if keep is None:
            keep = [round(i * (n_teacher - 1) / max(1, layers - 1)) for i in range(layers)] if layers > 1 else [0]
        t_state = teacher.state_dict()
        s_state = {}
        for name in student.state_dict():
            if ".layers." in name:
                head, rest = name.split(".layers.", 1)
                idx, tail = rest.split(".", 1)
                s_state[name] = t_state[f"{head}.layers.{keep[int(idx)]}.{tail}"].clone()
            else:
                s_state[name] = t_state[name].clone()
        student.load_state_dict(s_state)
        student.config.apt_kept_layers = keep
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.to(next(teacher.parameters()).device).to(next(teacher.parameters()).dtype)


# ---------------------------------------------------------------- distillation: the trainer


DISTILL_METHODS = ("sft", "kd", "gkd")


@dataclass
class DistillConfig:
    """Settings of :func:`train_distill`.

    method: ``"sft"`` (the data's tokens, the baseline), ``"kd"`` (the teacher's distributions on the data's
    completions, forward KL at ``temperature`` with the T² factor) or ``"gkd"`` (on-policy: with probability
    ``lmbda`` a step's completions are sampled from the student at ``sample_temperature``, else the data's; the
    teacher scores every token; the loss is T² · :func:`generalized_jsd` with ``beta`` at ``temperature``, which is
    ``"kd"``'s loss for β = 0 and TRL's ``GKDTrainer`` loss for T = 1);
    steps, batch_size, lr, warmup: AdamW with warm-up then cosine; max_new_tokens: sampled completion length;
    seed: batch order and sampling; on_policy_schedule: ``"random"`` (a coin of probability ``lmbda`` per step, as
    TRL's trainer) or ``"even"`` (exactly floor(``lmbda`` · steps) on-policy steps, evenly spaced, the first step
    on the data: at a budget of a few steps the coins may otherwise land on none)."""

    method: str = "kd"
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 5
    temperature: float = 2.0
    lmbda: float = 0.5
    beta: float = 0.5
    sample_temperature: float = 1.0
    max_new_tokens: int = 12
    seed: int = 0
    log_every: int = 5
    on_policy_schedule: str = "random"

    def __post_init__(self):
        if self.method not in DISTILL_METHODS:
            raise ValueError(f"method must be one of {DISTILL_METHODS}, got {self.method!r}")
        if self.on_policy_schedule not in ("random", "even"):
            raise ValueError(f"on_policy_schedule must be 'random' or 'even', got {self.on_policy_schedule!r}")
        if not self.temperature > 0 or not self.sample_temperature > 0:
            raise ValueError("temperature and sample_temperature must be > 0")
        if not 0.0 <= self.lmbda <= 1.0 or not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"lmbda and beta must be in [0, 1], got lmbda={self.lmbda}, beta={self.beta}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")


def check_student(student, teacher) -> None:
    """A clear error unless the student is smaller than the teacher and shares its vocabulary."""
    if student.config.vocab_size != teacher.config.vocab_size:
        raise ValueError(f"student vocabulary {student.config.vocab_size} != teacher's {teacher.config.vocab_size}: "
                         "logit distillation compares distributions over the same tokens")
    ns, nt = count_parameters(student), count_parameters(teacher)
    if ns >= nt:
        raise ValueError(f"the student ({ns:,} parameters) is not smaller than the teacher ({nt:,}): build it with "
                         "make_student(teacher, layers=...) with fewer layers or a smaller hidden_size")


def _student_samples(student, tokenizer, prompts: list[str], config: DistillConfig) -> dict:
    """The student's sampled completions for ``prompts`` as a right-padded training batch (prompt masked)."""
    roll = sample_groups(student, tokenizer, prompts, 1, config.max_new_tokens, config.sample_temperature)
    ids, cmask = roll["completion_ids"], roll["completion_mask"]
    completions = []
    for row, m in zip(ids.tolist(), cmask.tolist()):
        completions.append([t for t, k in zip(row, m) if k])
    rows, masks = [], []
    for p, c in zip(prompts, completions):
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        rows.append(p_ids + c)
        masks.append([0] * len(p_ids) + [1] * len(c))
    width = max(len(r) for r in rows)
    device = next(student.parameters()).device
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    cm = torch.tensor([m + [0] * (width - len(m)) for m in masks], device=device)
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": cm,
            "labels": input_ids.masked_fill(cm == 0, -100)}


def distill_batch_loss(student, teacher, batch: dict, config: DistillConfig) -> torch.Tensor:
    """The loss of one batch (``build_batch`` layout) for ``config.method``; the teacher runs without gradients."""
    logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if config.method == "sft":
        return completion_loss(logits, batch["labels"])
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["completion_mask"][:, 1:]  # position t predicts token t + 1
    if config.method == "kd":
        return kd_loss(logits[:, :-1], t_logits[:, :-1], mask, config.temperature)
    return config.temperature ** 2 * generalized_jsd(logits[:, :-1], t_logits[:, :-1], mask, config.beta,
                                                     config.temperature)


def train_distill(student, teacher, tokenizer, examples: list[dict], config: DistillConfig = DistillConfig(),
                  same_size: bool = False) -> dict:
    """Train ``student`` from ``teacher`` on instruction records (``prompt`` + ``completion``/``answer``).

    Every method sees the same batches of prompts in the same order (equal budget: ``config.steps`` optimiser
    steps of ``config.batch_size`` examples). ``same_size=True`` allows a student as big as the teacher (QAT: the
    fake-quantised copy learns from its float original). Returns the history ``{"step", "loss", "on_policy",
    "seconds"}``."""
    if same_size:
        if student.config.vocab_size != teacher.config.vocab_size:
            raise ValueError("student and teacher must share a vocabulary")
    else:
        check_student(student, teacher)
    prompts, completions = to_sft_pairs(examples, tokenizer)
    device = next(student.parameters()).device
    rng = random.Random(config.seed)  # the batches: the same for every method
    coin = random.Random(config.seed + 1)  # on-policy or not (gkd), drawn apart so the batches stay the same
    torch.manual_seed(config.seed)
    opt, sched = make_optimizer(student, config.lr, config.steps, config.warmup)
    teacher.eval()
    history = {"step": [], "loss": [], "on_policy": 0, "seconds": 0.0}
    start = time.perf_counter()
    student.train()
    for step in progress(range(config.steps), f"distill ({config.method})"):
        idx = rng.sample(range(len(prompts)), min(config.batch_size, len(prompts)))
        if config.on_policy_schedule == "even":
            on_policy = math.floor((step + 1) * config.lmbda) > math.floor(step * config.lmbda)
        else:
            on_policy = coin.random() < config.lmbda
        on_policy = on_policy and config.method == "gkd"
        if on_policy:
            batch = _student_samples(student, tokenizer, [prompts[i] for i in idx], config)
            history["on_policy"] += 1
        else:
            batch = build_batch(tokenizer, [prompts[i] for i in idx], [completions[i] for i in idx], device=device)
        loss = distill_batch_loss(student, teacher, batch, config)
        value = optimizer_step(loss, student, opt, sched)
        if step % config.log_every == 0 or step == config.steps - 1:
            history["step"].append(step)
            history["loss"].append(value)
    history["seconds"] = time.perf_counter() - start
    student.eval()
    return history


# ---------------------------------------------------------------- quantisation: group-wise, from scratch


def check_quant_args(bits: int, group_size: int, in_features: int | None = None) -> None:
    """A clear error for a bit width or group size the quantiser does not support."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported: use one of {SUPPORTED_BITS} (codes are packed whole into "
                         "bytes; 4 is the usual weight-only choice, 8 is nearly lossless)")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2 (weights sharing one scale and zero point), "
                         f"got {group_size!r}")
    if in_features is not None and in_features % group_size:
        divisors = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
        raise ValueError(f"group_size={group_size} does not divide the layer's {in_features} input features: "
                         f"use one that does, e.g. {divisors or [in_features]}")


def quantize_groupwise(w: torch.Tensor, bits: int = 4, group_size: int = 32) -> dict:
    """Asymmetric (min-max) quantisation of a 2-D weight, one scale and zero point per group of ``group_size``
    consecutive input weights of a row. Returns ``{"q" (uint8 codes in [0, 2^b - 1], w's shape), "scale",
    "zero" (rows × groups), "bits", "group_size", "shape"}``."""
    if w.dim() != 2:
        raise ValueError(f"quantize_groupwise takes a 2-D weight (out × in), got shape {tuple(w.shape)}")
    check_quant_args(bits, group_size, w.shape[1])
    qmax = 2 ** bits - 1
    g = w.detach().float().reshape(w.shape[0], -1, group_size)
    lo = g.amin(-1).clamp(max=0.0)  # the range always holds 0, so a zero weight stays exactly 0
    hi = g.amax(-1).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, qmax)
    return {"q": q.reshape(w.shape).to(torch.uint8), "scale": scale, "zero": zero, "bits": bits,
            "group_size": group_size, "shape": tuple(w.shape)}


def dequantize_groupwise(qt: dict) -> torch.Tensor:
    """ŵ = (q - zero) · scale, group by group: the weight the quantised model computes with."""
    rows, cols = qt["shape"]
    q = qt["q"].float().reshape(rows, -1, qt["group_size"])
    return ((q - qt["zero"].float()[..., None]) * qt["scale"].float()[..., None]).reshape(rows, cols)


def fake_quantize(w: torch.Tensor, bits: int = 4, group_size: int = 32) -> torch.Tensor:
    """Quantise-dequantise in the forward pass, identity in the backward pass (the straight-through estimator):
    ``w + (ŵ - w).detach()`` has the value ŵ and the gradient of w."""
    return w + (dequantize_groupwise(quantize_groupwise(w, bits, group_size)).to(w.dtype) - w).detach()


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """8 / bits codes per byte (uint8), little end first: what makes 4-bit weights half a byte each on disk."""
    per = 8 // bits
    flat = q.reshape(-1).to(torch.uint8)
    if flat.numel() % per:
        raise ValueError(f"{flat.numel()} codes do not fill whole bytes at {bits} bits")
    flat = flat.reshape(-1, per).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (flat << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32)[:, None] >> shifts) & (2 ** bits - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)


class QuantLinear(nn.Module):
    """A weight-only quantised ``nn.Linear``: packed ``bits``-bit codes, a float16 scale and a uint8 zero point
    per group; the forward pass dequantises the weight and runs an ordinary float matmul (no special kernel)."""

    def __init__(self, linear: nn.Linear, bits: int = 4, group_size: int = 32):
        super().__init__()
        qt = quantize_groupwise(linear.weight, bits, group_size)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size = bits, group_size
        self.register_buffer("packed", pack_codes(qt["q"], bits))
        self.register_buffer("scale", qt["scale"].to(torch.float16))
        self.register_buffer("zero", qt["zero"].to(torch.uint8))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def weight_hat(self) -> torch.Tensor:
        q = unpack_codes(self.packed, self.bits, self.in_features * self.out_features)
        return dequantize_groupwise({"q": q.reshape(self.out_features, self.in_features), "scale": self.scale,
                                     "zero": self.zero, "group_size": self.group_size,
                                     "shape": (self.out_features, self.in_features)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight_hat().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward pass sees :func:`fake_quantize` of its float weight (QAT): training keeps the
    float weights, the loss is that of the quantised model, the straight-through estimator passes the gradient."""

    bits: int = 4
    group_size: int = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.bits, self.group_size), self.bias)


def _decoder_linears(model):
    """(parent, attribute, module) of every ``nn.Linear`` inside the decoder layers (not the embeddings/head,
    which are tied to the input embedding in the tiny model and SmolLM2)."""
    for name, module in model.named_modules():
        if ".layers." not in f".{name}.":
            continue
        for attr, child in module.named_children():
            if type(child) in (nn.Linear, FakeQuantLinear):
                yield module, attr, child


def quantize_model(model, bits: int = 4, group_size: int = 32):
    """A copy of ``model`` with every decoder ``Linear`` replaced by a :class:`QuantLinear` (weight-only PTQ).
    A :func:`prepare_qat` model converts the same way (its trained float weights are quantised)."""
    for _, _, lin in _decoder_linears(model):
        check_quant_args(bits, group_size, lin.in_features)
        break
    out = copy.deepcopy(model)
    for parent, attr, lin in list(_decoder_linears(out)):
        setattr(parent, attr, QuantLinear(lin, bits, group_size))
    return out.eval()


@torch.no_grad()
def dequantize_model(model):
    """A copy of a :func:`quantize_model` model with each :class:`QuantLinear` replaced by an ``nn.Linear`` holding
    its dequantised weight ŵ: the same numbers, computed once instead of at every forward pass (float-sized again;
    for measuring a quantised model's replies quickly, not for deployment)."""
    out = copy.deepcopy(model)
    for _, module in list(out.named_modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, QuantLinear):
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                lin.weight.copy_(child.weight_hat())
                if child.bias is not None:
                    lin.bias.copy_(child.bias)
                setattr(module, attr, lin.to(child.packed.device))
    return out


def prepare_qat(model, bits: int = 4, group_size: int = 32):
    """A copy of ``model`` ready for quantisation-aware training: each decoder ``Linear`` becomes a
    :class:`FakeQuantLinear` that shares nothing with the original."""
    out = copy.deepcopy(model)
    for parent, attr, lin in list(_decoder_linears(out)):
        check_quant_args(bits, group_size, lin.in_features)
        lin.__class__ = FakeQuantLinear
        lin.bits, lin.group_size = bits, group_size
    return out


def float32_copy(model):
    """A float32 copy of ``model`` that computes in float32: without the bf16 autocast the smol profile puts on a
    CPU model (:func:`~apt_course.utils.use_cpu_bf16`), whose instance-level ``forward``/``generate`` are dropped
    so the class's own run. The baseline that int8 (which cannot run under bf16 autocast) is measured against."""
    out = copy.deepcopy(model).float()
    for attr in ("forward", "generate", "apt_precision"):
        out.__dict__.pop(attr, None)
    return out


@torch.no_grad()
def activation_outliers(model, batch: dict) -> dict:
    """For every decoder ``Linear``, max |x| / RMS(x) of its input x over one batch (``build_batch`` layout):
    how far the largest activation sits above the typical one. One int8 scale per tensor spends its 256 levels
    on the largest |x|, so at a ratio r the typical activation gets only about 128 / r of them (LLM.int8(),
    Dettmers et al. 2022; SmolLM2's MLP inputs reach r in the hundreds)."""
    device = _device_of(model)
    mask = batch["attention_mask"].to(device).bool()
    ratios, hooks = {}, []

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0].detach().float()[mask]  # real tokens only, not padding
            ratios[name] = float(x.abs().max() / x.pow(2).mean().sqrt().clamp(min=1e-12))
        return record

    for name, module in model.named_modules():
        if ".layers." in f".{name}." and type(module) in (nn.Linear, FakeQuantLinear):
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        model(input_ids=batch["input_ids"].to(device), attention_mask=mask.long())
    finally:
        for h in hooks:
            h.remove()
    return ratios


def quantize_int8_dynamic(model, keep_float=()):
    """int8 dynamic post-training quantisation with PyTorch's own API (``torch.ao.quantization.quantize_dynamic``):
    the decoder's ``Linear`` weights are stored as int8 with one scale per matrix; activations are quantised on
    the fly, per batch (the default qconfig; on the tiny model it lost less accuracy than per-channel weight scales).
    CPU kernels only: the result runs on the CPU (the deployment target), in float32 around the int8 matmuls (a
    bf16-autocast model is converted from its :func:`float32_copy`). ``keep_float``: names of ``Linear`` layers
    left in float (mixed precision, e.g. those :func:`activation_outliers` finds with extreme inputs)."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    names = {f"{pname}.{attr}" if pname else attr
             for pname, parent in model.named_modules() for attr, child in parent.named_children()
             if ".layers." in f".{pname}." and type(child) is nn.Linear}
    unknown = set(keep_float) - names
    if unknown:
        raise ValueError(f"keep_float names {sorted(unknown)[:3]}... are not decoder Linear layers of this model")
    names -= set(keep_float)
    cpu = float32_copy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch points eager-mode quantisation users to torchao
        return quantize_dynamic(cpu, {n: default_dynamic_qconfig for n in names}, dtype=torch.qint8)


# ---------------------------------------------------------------- pruning


def check_sparsity(sparsity: float) -> None:
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity is the fraction of weights set to zero: it must be in [0, 1), got {sparsity!r} "
                         "(0.5 zeroes half of each matrix; 1 would remove every weight)")


@torch.no_grad()
def magnitude_prune(model, sparsity: float):
    """A copy of ``model`` where, in every decoder ``Linear``, exactly round(``sparsity`` · n) of its n weights, those
    with the smallest |w| (ties broken by position), are set to zero (unstructured, per matrix). The matrices keep their shape: the zeros only save memory and
    time with a sparse format or sparse kernels."""
    check_sparsity(sparsity)
    out = copy.deepcopy(model)
    for _, _, lin in _decoder_linears(out):
        w = lin.weight
        k = round(sparsity * w.numel())
        if k:  # exactly k weights: a stable sort breaks ties at the threshold by index (the first ones go)
            order = torch.sort(w.abs().flatten(), stable=True).indices
            w.view(-1)[order[:k]] = 0.0
    return out


def sparsity_of(model) -> float:
    """The fraction of exactly-zero weights in the decoder's ``Linear`` layers."""
    zeros = total = 0
    for _, _, lin in _decoder_linears(model):
        zeros += int((lin.weight == 0).sum())
        total += lin.weight.numel()
    return zeros / max(1, total)


@torch.no_grad()
def head_importance(model) -> torch.Tensor:
    """(layers × key-value groups) weight-norm importance of each attention head group: the product of the norms of
    its value rows and its output-projection columns (a head whose values or outputs are small changes little).
    With grouped-query attention a group is one key/value head and the query heads that share it."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    scores = []
    for layer in model.model.layers:
        attn = layer.self_attn
        v = attn.v_proj.weight.reshape(cfg.num_key_value_heads, head_dim, -1).norm(dim=(1, 2))
        o = attn.o_proj.weight.reshape(attn.o_proj.weight.shape[0], cfg.num_key_value_heads, per_group * head_dim)
        scores.append(v * o.norm(dim=(0, 2)))
    return torch.stack(scores)


@torch.no_grad()
def prune_heads(model, keep: int):
    """A copy of ``model`` keeping the ``keep`` most important key-value head groups of every layer (by
    :func:`head_importance`); the q/k/v rows and o_proj columns of the others are removed, so the model really
    shrinks (and still loads with ``from_pretrained``: the config's head counts are updated)."""
    cfg = model.config
    groups = cfg.num_key_value_heads
    if not 1 <= keep < groups:
        raise ValueError(f"keep must be between 1 and {groups - 1} head groups (the model has {groups} per layer), "
                         f"got {keep!r}")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_group = cfg.num_attention_heads // groups
    if cfg.hidden_size % (keep * per_group):
        fits = [k for k in range(1, groups) if cfg.hidden_size % (k * per_group) == 0]
        raise ValueError(f"the hidden size ({cfg.hidden_size}) must be a multiple of the heads kept ({keep * per_group}) "
                         f"for transformers to load the pruned model: keep one of {fits} head groups")
    scores = head_importance(model)
    out = copy.deepcopy(model)
    for layer, s in zip(out.model.layers, scores):
        kept = sorted(s.argsort(descending=True)[:keep].tolist())
        kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in kept])
        q_rows = torch.cat([torch.arange(g * per_group * head_dim, (g + 1) * per_group * head_dim) for g in kept])
        attn = layer.self_attn
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            old = getattr(attn, name)
            new = nn.Linear(old.in_features, len(rows), bias=old.bias is not None).to(old.weight)
            new.weight.copy_(old.weight[rows])
            if old.bias is not None:
                new.bias.copy_(old.bias[rows])
            setattr(attn, name, new)
        old = attn.o_proj
        new = nn.Linear(len(q_rows), old.out_features, bias=old.bias is not None).to(old.weight)
        new.weight.copy_(old.weight[:, q_rows])
        if old.bias is not None:
            new.bias.copy_(old.bias)
        attn.o_proj = new
    out.config.num_attention_heads = keep * per_group
    out.config.num_key_value_heads = keep
    out.config.head_dim = head_dim
    return out


# ---------------------------------------------------------------- measuring: size, latency, memory


def count_weights(model) -> int:
    """The number of weights a model represents, whatever their storage: float parameters, the codes of a
    :class:`QuantLinear`, the int8 matrices of a dynamically quantised ``Linear``."""
    total = sum(p.numel() for p in model.parameters())  # a tied embedding/head counts once
    for module in model.modules():
        if isinstance(module, QuantLinear):
            total += module.in_features * module.out_features
        elif type(module).__name__ == "Linear" and callable(getattr(module, "weight", None)):  # torch's int8 Linear
            total += module.weight().numel() + (module.bias().numel() if module.bias() is not None else 0)
    return total


def state_bytes(model) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size on disk (tied weights are stored once)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@torch.no_grad()
def measure_latency(models: dict, tokenizer, prompt: str = "copy abcde", new_tokens: int = 32, repeats: int = 5,
                    warmup: int = 1) -> dict:
    """Seconds per generated token of each model (greedy, batch 1, ``new_tokens`` tokens, EOS ignored),
    measured round-robin - model A, B, C, A, B, C... - and reduced to the median, so a noisy machine slows all of
    them alike and their *ratios* stay meaningful. Each model runs on its own parameters' device."""
    text = format_prompt(tokenizer, prompt)
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    times = {name: [] for name in models}
    for r in range(warmup + repeats):
        for name, model in models.items():
            model.eval()
            device = _device_of(model)
            ids = enc["input_ids"].to(device)
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, temperature=None, top_k=None, top_p=None,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= warmup:
                times[name].append((time.perf_counter() - start) / new_tokens)
    return {name: statistics.median(t) for name, t in times.items()}


def _device_of(model) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def checkpointing_trade(model, tokenizer, examples: list[dict], batch_size: int = 64, repeats: int = 3) -> dict:
    """One training step (forward + backward) with and without gradient checkpointing, on the same batch.

    Memory: the bytes of the tensors autograd saves for the backward pass (counted with
    ``torch.autograd.graph.saved_tensors_hooks``: the activations a step holds, exact on any device), and on CUDA
    also the peak allocated memory. Time: the median of ``repeats`` steps, the two settings interleaved.
    Returns ``{"saved_mb", "saved_mb_ckpt", "seconds", "seconds_ckpt"}`` (+ ``peak_mb``, ``peak_mb_ckpt``)."""
    model = copy.deepcopy(model)
    device = _device_of(model)
    prompts, completions = to_sft_pairs(examples[:batch_size], tokenizer)
    batch = build_batch(tokenizer, prompts, completions, device=device)
    model.config.use_cache = False
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def step(checkpointing: bool) -> tuple[float, float, float]:
        # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias) to activation_checkpointing_*
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        if checkpointing:
            enable({"use_reentrant": False})
        else:
            disable()
        model.train()
        saved, seen = [0], set(params)

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:  # each activation once (views share storage); the weights are not activations
                seen.add(ptr)
                saved[0] += t.untyped_storage().nbytes()
            return t

        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = completion_loss(logits, batch["labels"])
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        model.zero_grad(set_to_none=True)
        return saved[0] / 2**20, seconds, peak

    runs = {False: [], True: []}
    for _ in range(repeats + 1):  # the first round warms up
        for flag in (False, True):
            runs[flag].append(step(flag))
    out = {}
    for flag, suffix in ((False, ""), (True, "_ckpt")):
        kept = runs[flag][1:]
        out[f"saved_mb{suffix}"] = kept[-1][0]
        out[f"seconds{suffix}"] = statistics.median(r[1] for r in kept)
        if device.type == "cuda":
            out[f"peak_mb{suffix}"] = max(r[2] for r in kept)
    return out


class HeldOut:
    """Held-out instruction records tokenised once, with the reference (teacher) model's logits kept, so one forward
    pass of a model gives both its held-out loss and its KL from the reference:

    * ``loss``: the completion-only cross-entropy of the reference answers, token-weighted (chapter 04's
      :func:`~apt_course.sft.heldout_loss`);
    * ``kl``: the mean per-token KL(reference || model) on those answers: how far a compressed model's next-token
      distributions moved from the model it was made from (0 = unchanged).

    Only the answer positions' logits are computed (``logits_to_keep``: the output layer skips the prompt) and kept.
    The reference's are kept when they take at most ``cache_mb`` megabytes, and recomputed for each model
    otherwise."""

    def __init__(self, reference, tokenizer, examples: list[dict], batch_size: int = 64, cache_mb: float = 256):
        prompts, completions = to_sft_pairs(examples, tokenizer)
        self.reference = reference
        self.batches = [build_batch(tokenizer, prompts[i:i + batch_size], completions[i:i + batch_size])
                        for i in range(0, len(prompts), batch_size)]
        size = sum(int(b["completion_mask"].sum()) for b in self.batches) * reference.config.vocab_size * 4 / 2**20
        self.cache = [self._logits(reference, b) for b in self.batches] if size <= cache_mb else None

    @staticmethod
    def _first(batch) -> int:
        """The position of the earliest answer token in the batch (right padding: each row's prompt comes first)."""
        return int(batch["completion_mask"].float().argmax(1).min())

    @staticmethod
    @torch.no_grad()
    def _logits(model, batch) -> torch.Tensor:
        """(answer tokens × vocabulary): the logits predicting each answer token, in float32 on the CPU."""
        device = _device_of(model)
        width, first = batch["input_ids"].shape[1], HeldOut._first(batch)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       logits_to_keep=width - first + 1).logits  # positions first - 1 ... width - 1
        mask = batch["completion_mask"][:, first:].bool()
        return logits[:, :-1].float().cpu()[mask]

    def scores(self, model) -> dict:
        was_training = model.training
        model.eval()
        loss = kl = 0.0
        count = 0
        for i, batch in enumerate(self.batches):
            logits = self._logits(model, batch)
            ref = self.cache[i] if self.cache is not None else self._logits(self.reference, batch)
            labels = batch["labels"][:, self._first(batch):][batch["completion_mask"][:, self._first(batch):].bool()]
            n = labels.numel()
            loss += F.cross_entropy(logits, labels, reduction="sum").item()
            kl += kd_loss(logits, ref).item() * n
            count += n
        model.train(was_training)
        return {"loss": loss / max(1, count), "kl": kl / max(1, count)}
