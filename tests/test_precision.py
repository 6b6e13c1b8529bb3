"""The real-model path's speed settings: bf16 autocast on a CPU that has it (float32 elsewhere, said once), and
CPU threads (every core for a real model, one for the tiny one, pinned by APT_COURSE_THREADS)."""

import copy

import pytest
import torch

from apt_course import profiles
from apt_course.checkpoints import load_checkpoint
from apt_course.lm import build_batch, completion_loss, generate
from apt_course.sft import add_lora
from apt_course.utils import (
    available_cores,
    cpu_bf16_supported,
    model_precision,
    set_cpu_threads,
    use_cpu_bf16,
)


@pytest.fixture
def tiny():
    model, tok = load_checkpoint("sft")
    batch = build_batch(tok, ["q: add 2 3\na:"] * 2, ["5", "6"])
    return model, tok, batch


def _loss(model, batch):
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return out.logits, completion_loss(out.logits, batch["labels"])


def test_bf16_autocast_keeps_float32_weights_gradients_and_logits_and_stays_close(tiny):
    model, tok, batch = tiny
    fast = use_cpu_bf16(copy.deepcopy(model))
    logits32, loss32 = _loss(model, batch)
    logits16, loss16 = _loss(fast, batch)
    assert logits16.dtype == torch.float32 and model_precision(fast) == "bf16 autocast"
    assert abs(loss16.item() - loss32.item()) < 0.05 * loss32.item() + 0.02  # bf16 rounding, not another model
    loss16.backward()
    assert all(p.dtype == torch.float32 and (p.grad is None or p.grad.dtype == torch.float32)
               for p in fast.parameters())
    assert generate(fast, tok, ["q: add 2 3\na:"], max_new_tokens=4)  # generate runs under one autocast region


def test_bf16_survives_deepcopy_and_lora(tiny):
    model, tok, batch = tiny
    fast = use_cpu_bf16(copy.deepcopy(model))
    twin = copy.deepcopy(fast)
    assert twin.forward.__self__ is twin and twin.generate.__self__ is twin  # bound to the copy, not the original
    with torch.no_grad():
        twin.model.embed_tokens.weight.add_(1.0)  # changing the copy must not change the original's output
    assert not torch.allclose(_loss(twin, batch)[0], _loss(fast, batch)[0])
    peft = add_lora(copy.deepcopy(fast), r=2, alpha=4, target_modules=("q_proj", "v_proj"))
    assert model_precision(peft) == "bf16 autocast"
    assert torch.allclose(_loss(peft, batch)[1], _loss(fast, batch)[1])  # B = 0: the adapter starts as identity


def test_precision_detection_can_be_forced_and_rejects_typos(monkeypatch):
    monkeypatch.setenv("APT_COURSE_PRECISION", "float32")
    assert cpu_bf16_supported() is False
    monkeypatch.setenv("APT_COURSE_PRECISION", "bf16")
    assert cpu_bf16_supported() is True
    monkeypatch.setenv("APT_COURSE_PRECISION", "half")
    with pytest.raises(ValueError, match="APT_COURSE_PRECISION"):
        cpu_bf16_supported()


def test_a_cpu_without_bf16_falls_back_to_float32_and_says_so(tiny, monkeypatch, capsys):
    model, _, _ = tiny
    monkeypatch.setenv("APT_COURSE_PRECISION", "float32")
    monkeypatch.setattr(profiles, "_PRECISION_SAID", set())
    out = profiles.cpu_precision(copy.deepcopy(model), "smol")
    assert "float32" in capsys.readouterr().out and model_precision(out) == "torch.float32"
    profiles.cpu_precision(copy.deepcopy(model), "smol")
    assert capsys.readouterr().out == ""  # said once
    monkeypatch.setenv("APT_COURSE_PRECISION", "bf16")
    assert model_precision(profiles.cpu_precision(copy.deepcopy(model), "smol")) == "bf16 autocast"
    assert model_precision(profiles.cpu_precision(copy.deepcopy(model), "tiny")) == "torch.float32"  # tiny: as is


def test_threads_every_core_for_a_real_model_one_for_tiny_and_pinned_by_the_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("APT_COURSE_THREADS", raising=False)
        assert set_cpu_threads(0) == available_cores() == torch.get_num_threads()
        assert set_cpu_threads(profiles.PROFILES["tiny"].cpu_threads) == 1
        assert profiles.PROFILES["smol"].cpu_threads == 0
        monkeypatch.setenv("APT_COURSE_THREADS", "1")
        assert set_cpu_threads(0) == 1
    finally:
        torch.set_num_threads(before)


def test_adapter_off_is_the_starting_model_and_never_freezes_the_policy(tiny):
    from apt_course.sft import AdapterOff

    model, tok, batch = tiny
    start = _loss(model, batch)[0]
    policy = add_lora(copy.deepcopy(model), r=2, alpha=4, target_modules=("q_proj", "v_proj"))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # the adapters now change the output
    ref = AdapterOff(policy).eval().requires_grad_(False)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    assert trainable, "requires_grad_(False) on the reference must not freeze the policy's adapters"
    with torch.no_grad():
        assert torch.allclose(ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, start,
                              atol=1e-5)
        assert not torch.allclose(_loss(policy, batch)[0], start, atol=1e-3)
    with pytest.raises(TypeError, match="PEFT model"):
        AdapterOff(model)
