"""Worked solutions (and plausible wrong answers) for the chapter 14 exercises."""

import torch


def quantize_dequantize():
    def fn(w, bits, group_size):
        qmax = 2 ** bits - 1
        g = w.reshape(w.shape[0], -1, group_size)  # rows x groups x group_size
        lo = g.amin(-1, keepdim=True).clamp(max=0.0)  # the range holds 0
        hi = g.amax(-1, keepdim=True).clamp(min=0.0)
        scale = ((hi - lo) / qmax).clamp(min=1e-8)
        zero = torch.round(-lo / scale).clamp(0, qmax)
        q = torch.clamp(torch.round(g / scale) + zero, 0, qmax)
        return ((q - zero) * scale).reshape(w.shape)

    return fn


def kd_loss():
    def fn(student_logits, teacher_logits, T):
        log_q = torch.log_softmax(student_logits / T, -1)
        log_p = torch.log_softmax(teacher_logits / T, -1)
        return T ** 2 * (log_p.exp() * (log_p - log_q)).sum(-1).mean()  # forward KL, T² keeps its scale

    return fn


def quantized_bytes():
    def fn(n_weights, bits, group_size):
        return n_weights * bits / 8 + n_weights / group_size * (2 + 1)  # codes + a float16 scale and a uint8 zero

    return fn


def _per_row():  # one range per row: a single outlier ruins the whole row
    return lambda w, bits, group_size: quantize_dequantize()(w, bits, w.shape[1])


SOLUTIONS = {
    "ch14.quantize_dequantize": quantize_dequantize,
    "ch14.kd_loss": kd_loss,
    "ch14.quantized_bytes": quantized_bytes,
}

WRONG = {
    "ch14.quantize_dequantize": _per_row,
    "ch14.kd_loss": lambda: lambda s, t, T: kd_loss()(s, t, T) / T ** 2,  # forgets the T² factor
    "ch14.quantized_bytes": lambda: lambda n, bits, group_size: n * bits / 8,  # forgets scales and zero points
}
