"""Chapter 07 exercises: the DPO loss, SimPO from summed log-probs, the weight DPO gives each pair."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import exercise, expect


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
