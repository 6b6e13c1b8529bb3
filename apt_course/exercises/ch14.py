"""Chapter 14 exercises: group-wise quantise-dequantise, the distillation loss at temperature T, the bytes of a
quantised model."""

from __future__ import annotations

import math

import torch

from ..compress import dequantize_groupwise, kd_loss, quantize_groupwise
from . import ExerciseFailed, exercise, expect, expect_close


def _need_function(fn, name):
    expect(callable(fn), f"pass your function itself (e.g. `{name}`), not {type(fn).__name__}")


@exercise("ch14.quantize_dequantize", "group-wise quantise and dequantise a weight matrix")
def check_quantize_dequantize(fn):
    _need_function(fn, "quantize_dequantize")
    g = torch.Generator().manual_seed(14)
    w = torch.randn(6, 64, generator=g) * 0.05
    w[0, 3] = 1.0  # one outlier: it should spoil the resolution of its own group only
    for bits, group in ((4, 16), (2, 32), (8, 64)):
        got = fn(w.clone(), bits, group)
        expect(got is not None, "your quantize_dequantize returned None: did you forget `return`?")
        got = torch.as_tensor(got, dtype=torch.float32)
        expect(got.shape == w.shape, f"return ŵ with w's shape {tuple(w.shape)}, got {tuple(got.shape)}")
        expect(not torch.allclose(got, w, atol=1e-7), "ŵ equals w: the weights were not rounded to 2^bits levels")
        want = dequantize_groupwise(quantize_groupwise(w, bits, group))
        per_row = dequantize_groupwise(quantize_groupwise(w, bits, w.shape[1]))
        if bits == 4 and torch.allclose(got, per_row, atol=1e-5) and not torch.allclose(want, per_row, atol=1e-5):
            raise ExerciseFailed("one range per row, not per group: cut each row into groups of group_size weights, "
                                 "each with its own scale and zero point")
        levels = len(torch.unique(got[1, :group]))
        expect(levels <= 2 ** bits, f"a group of {bits}-bit codes has at most {2 ** bits} distinct values; yours has "
                                    f"{levels}")
        expect(torch.allclose(got, want, atol=1e-5),
               f"{bits}-bit, groups of {group}: not the expected ŵ (max difference "
               f"{(got - want).abs().max():.3g}). s = (max - min) / (2^b - 1) with the range widened to contain 0, "
               "z = round(-min / s), q = clamp(round(w / s) + z, 0, 2^b - 1), ŵ = (q - z) · s")


@exercise("ch14.kd_loss", "the distillation loss at temperature T")
def check_kd_loss(fn):
    _need_function(fn, "kd_loss")
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 11, generator=g), 3 * torch.randn(5, 11, generator=g)
    for T in (1.0, 4.0):
        got = fn(s.clone(), t.clone(), T)
        expect(got is not None, "your kd_loss returned None: did you forget `return`?")
        expect(torch.is_tensor(got) and got.dim() == 0, "return a scalar torch tensor")
        want = kd_loss(s, t, temperature=T)
        p, q = torch.softmax(t / T, -1), torch.softmax(s / T, -1)
        reverse = T ** 2 * (q * (q.log() - p.log())).sum(-1).mean()
        if T > 1 and math.isclose(got.item(), want.item() / T ** 2, rel_tol=1e-4):
            raise ExerciseFailed("missing the T² factor: without it the loss (and its gradient) shrinks as T grows")
        if math.isclose(got.item(), reverse.item(), rel_tol=1e-4):
            raise ExerciseFailed("that is KL(student || teacher): Hinton's KD is the forward KL, KL(teacher || student) "
                                 "= sum p_teacher (log p_teacher - log p_student)")
        expect(math.isclose(got.item(), want.item(), rel_tol=1e-4, abs_tol=1e-6),
               f"at T = {T:g}: got {got.item():.5f}, expected {want.item():.5f} = T² · mean over tokens of "
               "KL(softmax(teacher / T) || softmax(student / T))")


@exercise("ch14.quantized_bytes", "the bytes of a group-wise quantised matrix")
def check_quantized_bytes(fn):
    _need_function(fn, "quantized_bytes")
    n = 7_000_000_000
    got = fn(n, 4, 128)
    expect(got is not None, "your quantized_bytes returned None: did you forget `return`?")
    codes_only = n * 4 / 8
    expect(not math.isclose(float(got), codes_only), "the codes are only part of it: every group also stores its "
                                                     "scale (2 bytes) and zero point (1 byte)")
    expect_close(got, codes_only + n / 128 * 3, 1, "bytes at 4 bits, groups of 128")
    expect_close(fn(4096, 2, 32), 4096 / 4 + 4096 / 32 * 3, 0.5, "bytes of 4096 weights at 2 bits, groups of 32")
