"""ORPO: the odds ratio on fixed numbers, parity with TRL's experimental ORPOTrainer, the trainer, bad input."""

import math
import warnings

import pytest
import torch

from apt_course import dpo, orpo, world
from apt_course.lm import build_pair_batch
from apt_course.model import make_tiny_model
from apt_course.tokenizer import chat_prompt

T = torch.tensor


def test_log1mexp_is_stable_and_exact():
    x = T([-1e-6, -0.1, -0.6931, -1.0, -30.0], dtype=torch.float64)
    assert torch.allclose(orpo.log1mexp(x), torch.log(1 - torch.exp(x)), rtol=1e-6)
    assert torch.isfinite(orpo.log1mexp(T([-1e-9, 0.0]))).all()
    with pytest.raises(ValueError, match="x <= 0"):
        orpo.log1mexp(T([0.1]))


def _or_term(avg_c, avg_r):
    return -torch.nn.functional.logsigmoid(orpo.log_odds_ratio(avg_c, avg_r)).mean()


def test_orpo_gradient_stays_finite_and_right_near_certainty():
    """Near certainty (a length-averaged log-prob in (-3e-8, 0), where the NLL term drives training) the
    unselected branch of log1mexp has an infinite derivative; its gradient must not turn into NaN."""
    avg_c, avg_r = T([-1e-9, -0.5], requires_grad=True), T([-1.0, -2.0])
    _or_term(avg_c, avg_r).backward()
    exact_c = avg_c.detach().double().requires_grad_()
    lo = (exact_c - avg_r.double()) - (torch.log(-torch.expm1(exact_c)) - torch.log(-torch.expm1(avg_r.double())))
    (-torch.nn.functional.logsigmoid(lo).mean()).backward()
    assert torch.isfinite(avg_c.grad).all()
    assert torch.allclose(avg_c.grad.double(), exact_c.grad, rtol=1e-4, atol=1e-7)
    at_zero = T([0.0, -0.5], requires_grad=True)  # exactly certain: finite value and gradient, no exception
    loss = _or_term(at_zero, avg_r)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(at_zero.grad).all()


def test_orpo_loss_matches_hand_computation():
    # P(y_w) = 0.5 -> odds 1; P(y_l) = 0.2 -> odds 0.25; log odds ratio = log 4
    avg_c, avg_r = T([math.log(0.5)]), T([math.log(0.2)])
    loss, or_term, log_odds = orpo.orpo_loss(T(1.0), avg_c, avg_r, beta=0.5)
    assert log_odds.item() == pytest.approx(math.log(4), abs=1e-6)
    assert or_term.item() == pytest.approx(-math.log(0.8), abs=1e-6)  # -log sigmoid(log 4) = -log(4/5)
    assert loss.item() == pytest.approx(1.0 - 0.5 * math.log(0.8), abs=1e-6)
    assert orpo.orpo_loss(T(1.0), avg_c, avg_r, beta=0.0)[0].item() == pytest.approx(1.0)  # beta 0 = SFT
    with pytest.raises(ValueError, match="beta"):
        orpo.orpo_loss(T(1.0), avg_c, avg_r, beta=-1.0)
    with pytest.raises(ValueError, match="beta must be >= 0"):
        orpo.ORPOConfig(beta=-0.1)


def test_orpo_nll_is_the_sft_loss_on_chosen(tok):
    from apt_course.lm import build_batch, completion_loss

    model = make_tiny_model(tok, seed=2)
    pairs = world.preference_pairs(5, "train", seed=3)
    with torch.no_grad():
        _, stats = orpo.orpo_batch_loss(model, build_pair_batch(tok, pairs), beta=0.1)
        b = build_batch(tok, [chat_prompt(p["prompt"]) for p in pairs], [p["chosen"] for p in pairs])
        sft = completion_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
    assert stats["nll"] == pytest.approx(sft.item(), abs=1e-5)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_matches_trl_experimental_orpotrainer(tok, tmp_path, beta):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from apt_course.data import to_trl_preference_dataset

    torch.set_num_threads(1)
    model = make_tiny_model(tok, seed=1)
    pairs = world.preference_pairs(6, "train", seed=0)
    ds = to_trl_preference_dataset(pairs, tok)
    args = ORPOConfig(output_dir=str(tmp_path), beta=beta, max_length=256, report_to="none", use_cpu=True, bf16=False,
                      per_device_train_batch_size=len(pairs), max_steps=1, save_strategy="no", disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ORPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch).item()
        ours = orpo.orpo_batch_loss(model, build_pair_batch(tok, pairs), beta, nll_on_prompt=True)[0].item()
        paper = orpo.orpo_batch_loss(model, build_pair_batch(tok, pairs), beta)[0].item()
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    assert abs(paper - theirs) > 1e-4  # TRL's NLL includes the prompt; the paper's (our default) does not


def test_train_orpo_learns_sft_and_preferences_in_one_stage(tok):
    model = make_tiny_model(tok, seed=0)
    train = world.preference_pairs(128, "train", seed=0, kinds=("polite",))
    test = world.preference_pairs(64, "test", seed=0, kinds=("polite",))
    before = dpo.implicit_reward_accuracy(model, tok, test, normalize=True)
    hist = orpo.train_orpo(model, tok, train, orpo.ORPOConfig(steps=25, batch_size=16, lr=3e-3, beta=1.0))
    after = dpo.implicit_reward_accuracy(model, tok, test, normalize=True)
    assert hist["nll"][-1] < 0.5 * hist["nll"][0]  # the SFT half
    assert hist["log_odds"][-1] > hist["log_odds"][0]  # the preference half
    assert after >= 0.9 and after > before, (before, after)


def test_orpo_rejects_bad_pairs(tok):
    with pytest.raises(KeyError, match="row 0 has no .rejected. column"):
        orpo.train_orpo(make_tiny_model(tok), tok, [{"prompt": "hi", "chosen": "a"}], orpo.ORPOConfig(steps=1))


def test_training_state_bytes_counts_the_reference():
    model = torch.nn.Linear(10, 10)  # 110 float32 parameters = 440 bytes
    alone = orpo.training_state_bytes(model)
    assert alone == {"weights": 440, "gradients": 440, "optimizer": 880, "reference": 0, "total": 1760}
    assert orpo.training_state_bytes(model, reference=torch.nn.Linear(10, 10))["total"] == 1760 + 440


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_lora_copies_share_one_model_and_train_apart(tok):
    """trainable_copies with LoRA: every view starts as the model; training one view moves it alone; the
    frozen weights are shared (no copy), the adapters stay trainable and the PEFT model's state is restored."""
    model = make_tiny_model(tok, seed=3)
    pairs = world.preference_pairs(8, "train", seed=1)
    batch = build_pair_batch(tok, pairs)
    start = _logits(model, batch)
    views = orpo.trainable_copies(model, ("first", "second"), lora_rank=4, seed=0)
    base, a, b = views[None], views["first"], views["second"]
    for view in (base, a, b):
        assert torch.allclose(_logits(view, batch), start, atol=1e-6)  # B = 0: every copy computes as the model
    peft_model = a.peft_model
    shared = {id(p) for p in base.parameters()}
    assert shared < {id(p) for p in a.parameters()} and shared < {id(p) for p in b.parameters()}
    adapter_a = {id(p) for n, p in a.named_parameters() if "lora_" in n}
    adapter_b = {id(p) for n, p in b.named_parameters() if "lora_" in n}
    assert adapter_a and adapter_b and not adapter_a & adapter_b and not adapter_a & shared  # the adapters are apart
    orpo.train_orpo(a, tok, pairs, orpo.ORPOConfig(steps=3, batch_size=8, lr=1e-2, warmup=0))
    assert not torch.allclose(_logits(a, batch), start, atol=1e-4)  # a trained
    assert torch.allclose(_logits(b, batch), start, atol=1e-6) and torch.allclose(_logits(base, batch), start, atol=1e-6)
    assert all(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)
    assert peft_model.active_adapters == ["first"]  # set when the PEFT model was built; the views switched back
    orpo.copy_weights(a, b)
    assert torch.allclose(_logits(b, batch), _logits(a, batch), atol=1e-6)
    state = orpo.training_state_bytes(b, reference=a)
    adapter_bytes = sum(p.numel() * p.element_size() for p in a.parameters() if p.requires_grad)
    assert state["reference"] == adapter_bytes and state["gradients"] == adapter_bytes  # a LoRA reference: its adapter
    with pytest.raises(ValueError, match="no adapter"):
        orpo.AdapterView(peft_model, "third")


def test_adapter_off_reference_trains_dpo_as_a_separate_copy(tok):
    """DPO with the reference = the same PEFT model with its adapter switched off takes the same steps as DPO
    with a separate frozen copy of the starting model as the reference (the switch costs no gradient)."""
    import copy

    pairs = world.preference_pairs(16, "train", seed=2)
    config = dpo.DPOConfig(steps=3, batch_size=8, lr=1e-2, warmup=0, sft_weight=1.0, log_every=1)
    model = make_tiny_model(tok, seed=4)
    separate_ref = copy.deepcopy(model)
    views = orpo.trainable_copies(model, ("policy",), lora_rank=4, seed=0)
    with_view = dpo.train_dpo(views["policy"], views[None], tok, pairs, config)
    model2 = make_tiny_model(tok, seed=4)
    views2 = orpo.trainable_copies(model2, ("policy",), lora_rank=4, seed=0)
    with_copy = dpo.train_dpo(views2["policy"], separate_ref, tok, pairs, config)
    assert with_view["loss"] == pytest.approx(with_copy["loss"], rel=1e-5, abs=1e-6)
    assert with_view["margin"][-1] > 0


def test_trainable_copies_without_lora_are_deep_copies(tok):
    model = make_tiny_model(tok, seed=5)
    copies = orpo.trainable_copies(model, ("x", "y"))
    assert copies[None] is model and copies["x"] is not model and copies["x"] is not copies["y"]
    with torch.no_grad():
        next(copies["x"].parameters()).add_(1.0)
    orpo.copy_weights(copies["x"], copies["y"])
    assert torch.equal(next(copies["y"].parameters()), next(copies["x"].parameters()))
    assert not torch.equal(next(model.parameters()), next(copies["x"].parameters()))
