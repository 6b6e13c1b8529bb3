"""Chapter 14: the distillation losses on known numbers and against TRL's GKDTrainer, the group-wise quantiser's
error bound, QAT's straight-through gradient, pruning, the measurements, and clear errors for bad input."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from apt_course import compress as C
from apt_course import world
from apt_course.lm import build_batch
from apt_course.model import count_parameters, make_tiny_model, save_model
from apt_course.sft import heldout_loss, to_sft_pairs

T = torch.tensor


@pytest.fixture(scope="module")
def teacher(tok):
    return make_tiny_model(tok, seed=1).eval()


@pytest.fixture(scope="module")
def examples():
    return world.instruction_examples(16, "train", seed=5)


# ---------------------------------------------------------------- distillation losses


def test_kd_loss_is_t_squared_times_the_forward_kl():
    s, t = T([[0.0, 1.0, 2.0]]), T([[2.0, 0.0, 0.0]])
    for temp in (1.0, 2.0, 4.0):
        p, q = torch.softmax(t / temp, -1), torch.softmax(s / temp, -1)
        want = temp ** 2 * float((p * (p / q).log()).sum())
        assert C.kd_loss(s, t, temperature=temp).item() == pytest.approx(want, rel=1e-5)
    # a hand-checked case: teacher (1/2, 1/2), student (1/4, 3/4): KL = 1/2 log 2 + 1/2 log(2/3)
    s2, t2 = T([[0.0, math.log(3.0)]]), T([[0.0, 0.0]])
    assert C.kd_loss(s2, t2).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    assert C.kd_loss(t, t, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_averages_over_the_masked_positions_only():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = T([[1, 0, 0], [1, 1, 0]])
    per_token = torch.stack([C.kd_loss(s[i, j], t[i, j]) for i, j in [(0, 0), (1, 0), (1, 1)]])
    assert C.kd_loss(s, t, mask).item() == pytest.approx(per_token.mean().item(), rel=1e-5)


def test_the_t_squared_factor_keeps_the_gradient_scale_across_temperatures():
    """Without T², the soft term's gradient shrinks about as 1/T²; with it, it stays of the same order."""
    g = torch.Generator().manual_seed(1)
    t = torch.randn(64, 20, generator=g)
    s0 = t + 0.3 * torch.randn(64, 20, generator=g)
    norms = {}
    for temp in (2.0, 8.0):
        s = s0.clone().requires_grad_()
        C.kd_loss(s, t, temperature=temp).backward()
        norms[temp] = s.grad.norm().item()
    assert 0.5 < norms[8.0] / norms[2.0] < 2.0, norms


def test_generalized_jsd_ends_are_the_two_kls_and_the_middle_is_the_jsd():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    kl = lambda a, b: (a * (a / b).log()).sum(-1).mean().item()  # noqa: E731
    assert C.generalized_jsd(s, t, beta=0.0).item() == pytest.approx(kl(p, q), rel=1e-5)
    assert C.generalized_jsd(s, t, beta=1.0).item() == pytest.approx(kl(q, p), rel=1e-5)
    m = 0.5 * p + 0.5 * q
    assert C.generalized_jsd(s, t, beta=0.5).item() == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m), rel=1e-5)
    assert C.generalized_jsd(s, t, beta=0.5).item() <= math.log(2)  # the JSD is bounded
    with pytest.raises(ValueError, match=r"beta .* must be in \[0, 1\]"):
        C.generalized_jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        C.kd_loss(s, t, temperature=0.0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_loss_matches_trl_gkdtrainer_on_one_batch(tok, teacher, examples, tmp_path, beta):
    from datasets import Dataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd import GKDConfig, GKDTrainer

    from apt_course.tokenizer import messages_for

    torch.set_num_threads(1)
    student = C.make_student(teacher, 2)
    rows = examples[:6]
    ds = Dataset.from_list([{"messages": messages_for(e["prompt"], assistant=e["answer"])} for e in rows])
    with warnings.catch_warnings():  # TRL's experimental trainers warn about themselves and deprecated names
        warnings.simplefilter("ignore")
        args = GKDConfig(output_dir=str(tmp_path), beta=beta, lmbda=0.0, report_to="none", use_cpu=True, bf16=False,
                         per_device_train_batch_size=len(rows), max_steps=1, save_strategy="no", disable_tqdm=True,
                         max_length=256)
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])  # TRL pads on the left
    prompts, completions = to_sft_pairs(rows, tok)
    ours_batch = build_batch(tok, prompts, completions)
    assert torch.equal(batch["labels"][batch["labels"] != -100], ours_batch["labels"][ours_batch["labels"] != -100])
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, dict(batch)).item()
        ours = C.distill_batch_loss(student, teacher, ours_batch, C.DistillConfig(method="gkd", beta=beta,
                                                                                  temperature=1.0)).item()
    assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-7)
    if beta == 0.0:  # forward KL at T = 1 is Hinton's KD without a temperature
        kd = C.distill_batch_loss(student, teacher, ours_batch, C.DistillConfig(method="kd", temperature=1.0)).item()
        assert kd == pytest.approx(ours, rel=1e-6)


# ---------------------------------------------------------------- students


def test_make_student_copies_evenly_spaced_teacher_layers_and_generates(tok, teacher):
    student = C.make_student(teacher, 2)
    assert student.config.num_hidden_layers == 2 and student.config.apt_kept_layers == [0, 3]
    for i, j in enumerate([0, 3]):
        assert torch.equal(student.model.layers[i].mlp.up_proj.weight, teacher.model.layers[j].mlp.up_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert count_parameters(student) < count_parameters(teacher)
    ids = tok("<|user|>copy ab<|assistant|>", return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = student.generate(input_ids=ids, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                           pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids.shape[1] + 4  # the KV cache works with the renumbered layers
    narrow = C.make_student(teacher, 2, hidden_size=64, intermediate_size=192)
    assert narrow.config.hidden_size == 64 and count_parameters(narrow) < count_parameters(student)


def test_make_student_keeps_the_listed_teacher_layers(teacher):
    student = C.make_student(teacher, keep=[0, 1, 3])
    assert student.config.num_hidden_layers == 3 and student.config.apt_kept_layers == [0, 1, 3]
    for i, j in enumerate([0, 1, 3]):
        assert torch.equal(student.model.layers[i].self_attn.o_proj.weight,
                           teacher.model.layers[j].self_attn.o_proj.weight)
    for bad in ([], [0, 0], [4], [-1]):
        with pytest.raises(ValueError, match="distinct teacher layers"):
            C.make_student(teacher, keep=bad)
    with pytest.raises(ValueError, match="one or the other"):
        C.make_student(teacher, 2, keep=[0, 1, 3])
    with pytest.raises(ValueError, match="exact size"):
        C.make_student(teacher, keep=[0, 1, 2, 3])


def test_a_student_bigger_than_its_teacher_is_refused(tok, teacher, examples):
    with pytest.raises(ValueError, match="1 to 4 layers"):
        C.make_student(teacher, 6)
    with pytest.raises(ValueError, match="exceeds the teacher"):
        C.make_student(teacher, 2, hidden_size=256)
    with pytest.raises(ValueError, match="exact size"):
        C.make_student(teacher, 4)
    bigger = make_tiny_model(tok, seed=0, layers=6)
    with pytest.raises(ValueError, match="not smaller than the teacher"):
        C.train_distill(bigger, teacher, tok, examples, C.DistillConfig(steps=1))
    with pytest.raises(ValueError, match="method must be one of"):
        C.DistillConfig(method="dpo")


@pytest.mark.parametrize("method", ["kd", "gkd"])
def test_distillation_moves_the_student_towards_the_teacher(tok, method):
    from apt_course.checkpoints import load_checkpoint

    torch.set_num_threads(1)
    teacher, tok2 = load_checkpoint("sft")
    train = world.instruction_examples(200, "train", seed=0)
    held = C.HeldOut(teacher, tok2, world.instruction_examples(48, "test", seed=0))
    student = C.make_student(teacher, 2)
    before = held.scores(student)["kl"]
    hist = C.train_distill(student, teacher, tok2, train, C.DistillConfig(
        method=method, steps=12, batch_size=16, lr=2e-3, temperature=2.0, lmbda=0.5, seed=0, max_new_tokens=8))
    after = held.scores(student)["kl"]
    assert after < 0.8 * before, (before, after)
    assert (hist["on_policy"] > 0) == (method == "gkd")


def test_the_even_schedule_takes_exactly_lambda_times_the_steps_on_policy(tok, teacher, examples):
    config = dict(method="gkd", steps=5, batch_size=4, lr=1e-4, lmbda=0.5, max_new_tokens=4, log_every=1)
    for seed in range(3):  # whatever the seed's coins would have said
        hist = C.train_distill(C.make_student(teacher, 2), teacher, tok, examples,
                               C.DistillConfig(seed=seed, on_policy_schedule="even", **config))
        assert hist["on_policy"] == 2  # floor(0.5 * 5): steps 1 and 3
    with pytest.raises(ValueError, match="on_policy_schedule"):
        C.DistillConfig(on_policy_schedule="sometimes")


def test_heldout_scores_match_chapter_04s_heldout_loss(tok, teacher, examples):
    held = C.HeldOut(teacher, tok, examples, batch_size=5)
    other = make_tiny_model(tok, seed=3)
    scores = held.scores(other)
    assert scores["loss"] == pytest.approx(heldout_loss(other, tok, examples), rel=1e-5)
    assert scores["kl"] > 0 and held.scores(teacher)["kl"] == pytest.approx(0.0, abs=1e-6)
    uncached = C.HeldOut(teacher, tok, examples, batch_size=5, cache_mb=0)
    assert uncached.cache is None and uncached.scores(other)["kl"] == pytest.approx(scores["kl"], rel=1e-6)


# ---------------------------------------------------------------- quantisation


@pytest.mark.parametrize("bits,group", [(8, 32), (4, 16), (4, 128), (2, 32)])
def test_groupwise_quantiser_round_trips_within_half_a_step(bits, group):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(8, 128, generator=g) * 0.1
    w[2, 5] = 3.0  # an outlier widens the range of its own group only
    w[3, 7] = 0.0
    qt = C.quantize_groupwise(w, bits, group)
    assert qt["q"].dtype == torch.uint8 and int(qt["q"].max()) <= 2 ** bits - 1
    assert qt["scale"].shape == (8, 128 // group)
    err = (C.dequantize_groupwise(qt) - w).abs().reshape(8, -1, group)
    assert (err <= qt["scale"][..., None] / 2 + 1e-6).all()  # rounding moves a weight by at most s/2
    assert C.dequantize_groupwise(qt)[3, 7] == 0.0  # the range holds 0, so zero stays zero
    if group < 128:  # rows without the outlier keep their resolution
        assert qt["scale"][2, 0] > 5 * qt["scale"][2, 1]
    assert torch.equal(C.unpack_codes(C.pack_codes(qt["q"], bits), bits, w.numel()).reshape(w.shape), qt["q"])


def test_quantiser_levels_and_a_hand_computed_group():
    # one group: min -1, max 2.75 -> s = 3.75 / 15 = 0.25, z = round(1 / 0.25) = 4; 0.6 / 0.25 = 2.4 rounds to 2
    w = T([[-1.0, 0.0, 0.6, 2.75]])
    qt = C.quantize_groupwise(w, bits=4, group_size=4)
    assert qt["scale"].item() == pytest.approx(0.25) and qt["zero"].item() == 4
    assert qt["q"].tolist() == [[0, 4, 6, 15]]
    assert torch.allclose(C.dequantize_groupwise(qt), T([[-1.0, 0.0, 0.5, 2.75]]))


def test_unsupported_bit_widths_and_group_sizes_are_clear_errors(tok, teacher):
    w = torch.randn(4, 96)
    with pytest.raises(ValueError, match=r"bits=3 is not supported: use one of \(2, 4, 8\)"):
        C.quantize_groupwise(w, 3, 32)
    with pytest.raises(ValueError, match="group_size=64 does not divide the layer's 96 input features"):
        C.quantize_groupwise(w, 4, 64)
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        C.quantize_groupwise(w, 4, 0)
    with pytest.raises(ValueError, match="does not divide"):
        C.quantize_model(teacher, 4, 100)
    with pytest.raises(ValueError, match="not supported"):
        C.prepare_qat(teacher, 16, 32)


def test_quantized_model_is_smaller_and_computes_with_the_dequantised_weights(tok, teacher, tmp_path):
    q4 = C.quantize_model(teacher, 4, 32)
    lin = q4.model.layers[0].self_attn.q_proj
    assert isinstance(lin, C.QuantLinear)
    x = torch.randn(3, 128)
    want = F.linear(x, C.dequantize_groupwise(C.quantize_groupwise(teacher.model.layers[0].self_attn.q_proj.weight,
                                                                     4, 32)))
    assert torch.allclose(lin(x), want, atol=1e-3)  # the scale is stored in float16
    assert C.count_weights(q4) == count_parameters(teacher)
    fp32, b4 = C.state_bytes(teacher), C.state_bytes(q4)
    linear = sum(lin.weight.numel() for _, _, lin in C._decoder_linears(teacher))
    assert fp32 - b4 == pytest.approx(linear * 4 - linear * (0.5 + 3 / 32), rel=0.02)  # 4 bytes -> 4 bits + group data
    q8 = C.quantize_int8_dynamic(teacher)
    ids = torch.randint(10, 60, (2, 12))
    with torch.no_grad():
        ref, got = teacher(input_ids=ids).logits, q8(input_ids=ids).logits
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert C.state_bytes(q8) < 0.4 * fp32
    assert C.count_weights(q8) == count_parameters(teacher)


def test_dequantized_model_computes_what_the_quantized_one_does(teacher):
    q4 = C.quantize_model(teacher, 4, 32)
    flat = C.dequantize_model(q4)
    assert not any(isinstance(m, C.QuantLinear) for m in flat.modules())
    ids = torch.randint(10, 60, (2, 12))
    with torch.no_grad():
        assert torch.allclose(q4(input_ids=ids).logits, flat(input_ids=ids).logits, atol=1e-5)


def test_int8_can_keep_the_outlier_layers_in_float(tok, teacher, examples):
    batch = build_batch(tok, *to_sft_pairs(examples[:4], tok))
    ratios = C.activation_outliers(teacher, batch)
    names = {f"{p}.{a}" for p, m in teacher.named_modules() for a, c in m.named_children()
             if ".layers." in f".{p}." and type(c) is torch.nn.Linear}
    assert set(ratios) == names and all(r >= 1 for r in ratios.values())  # max |x| >= RMS(x)
    x = torch.zeros(1, 4, 128)
    x[0, 0, 0] = 10.0  # one outlier among 512 values: max / RMS = sqrt(512)
    lin = teacher.model.layers[0].self_attn.q_proj
    hook = lin.register_forward_pre_hook(lambda m, args: (x.expand(args[0].shape[0], -1, -1)[:, :args[0].shape[1]],))
    try:
        one = C.activation_outliers(teacher, {"input_ids": batch["input_ids"][:1, :4],
                                              "attention_mask": torch.ones(1, 4, dtype=torch.long)})
    finally:
        hook.remove()
    assert one["model.layers.0.self_attn.q_proj"] == pytest.approx(512 ** 0.5, rel=1e-4)
    worst = max(ratios, key=ratios.get)
    q8 = C.quantize_int8_dynamic(teacher, keep_float=[worst])
    parent, attr = worst.rsplit(".", 1)
    assert type(getattr(q8.get_submodule(parent), attr)) is torch.nn.Linear
    assert type(q8.model.layers[0].mlp.up_proj).__name__ == "Linear" and callable(q8.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="not decoder Linear"):
        C.quantize_int8_dynamic(teacher, keep_float=["model.embed_tokens"])


def test_float32_copy_drops_the_bf16_autocast(teacher):
    from apt_course.utils import model_precision, use_cpu_bf16

    fast = use_cpu_bf16(copy.deepcopy(teacher))
    plain = C.float32_copy(fast)
    assert model_precision(fast) == "bf16 autocast" and model_precision(plain) == "torch.float32"
    ids = torch.randint(10, 60, (1, 8))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, teacher(input_ids=ids).logits)
    C.quantize_int8_dynamic(fast)(input_ids=ids)  # int8 kernels refuse bf16 inputs: the copy computes in float32


def test_fake_quantize_has_the_quantised_value_and_the_identity_gradient():
    w = torch.randn(4, 32, requires_grad=True)
    fq = C.fake_quantize(w, 4, 16)
    assert torch.allclose(fq, C.dequantize_groupwise(C.quantize_groupwise(w, 4, 16)))
    (fq * torch.arange(32.0)).sum().backward()
    assert torch.equal(w.grad, torch.arange(32.0).expand(4, 32))  # straight through: d ŵ / d w = 1


def test_qat_trains_the_float_weights_through_the_rounding(tok, teacher, examples):
    fake = C.prepare_qat(teacher, 4, 32)
    assert isinstance(fake.model.layers[0].mlp.up_proj, C.FakeQuantLinear)
    assert type(teacher.model.layers[0].mlp.up_proj) is torch.nn.Linear  # the original is untouched
    before = fake.model.layers[0].mlp.up_proj.weight.detach().clone()
    C.train_distill(fake, teacher, tok, examples, C.DistillConfig(method="kd", steps=2, batch_size=4, lr=1e-3),
                    same_size=True)
    assert not torch.equal(fake.model.layers[0].mlp.up_proj.weight, before)
    assert isinstance(C.quantize_model(fake, 4, 32).model.layers[0].mlp.up_proj, C.QuantLinear)


# ---------------------------------------------------------------- pruning


def test_magnitude_prune_zeroes_the_smallest_weights_of_each_matrix(teacher):
    pruned = C.magnitude_prune(teacher, 0.5)
    assert C.sparsity_of(pruned) == pytest.approx(0.5, abs=0.01)
    assert C.sparsity_of(teacher) < 0.01  # the original is untouched
    w, p = teacher.model.layers[1].mlp.down_proj.weight, pruned.model.layers[1].mlp.down_proj.weight
    kept = p != 0
    assert w[kept].abs().min() >= w[~kept].abs().max()
    assert C.sparsity_of(C.magnitude_prune(teacher, 0.0)) < 0.01
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"sparsity .* must be in \[0, 1\)"):
            C.magnitude_prune(teacher, bad)


def _one_matrix_model(row: list[float]) -> torch.nn.Module:
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Module()])
    model.layers[0].proj = torch.nn.Linear(len(row), 1, bias=False)
    with torch.no_grad():
        model.layers[0].proj.weight.copy_(T([row]))
    return model


@pytest.mark.parametrize("row, want", [
    ([0.05, -0.05, 0.05, -0.05], [0.0, 0.0, 0.05, -0.05]),  # all tied: the first two by position go
    ([0.1, 0.2, 0.2, 0.3], [0.0, 0.0, 0.2, 0.3]),  # a tie at the threshold: only one of the two 0.2s goes
])
def test_magnitude_prune_removes_exactly_round_sparsity_n_weights_even_with_ties(row, want):
    pruned = C.magnitude_prune(_one_matrix_model(row), 0.5)
    w = pruned.layers[0].proj.weight[0]
    assert int((w == 0).sum()) == 2
    assert w.tolist() == pytest.approx(want)
    assert int((C.magnitude_prune(_one_matrix_model(row), 0.3).layers[0].proj.weight == 0).sum()) == 1  # round(1.2)


def test_kd_losses_are_finite_when_the_teacher_gives_a_token_no_mass():
    """0 · log 0 = 0: a teacher's -inf logit drops that token from the KL, it does not make it NaN."""
    t = T([[1.0, 0.0, float("-inf"), 2.0]])
    s0 = T([[0.5, -1.0, 0.3, 1.0]])
    p = torch.softmax(t[:, [0, 1, 3]], -1)[0]
    q = torch.softmax(s0, -1)[0, [0, 1, 3]]
    want = float((p * (p / q).log()).sum())  # by hand, on the teacher's support only
    for loss_fn in (lambda s: C.kd_loss(s, t), lambda s: C.generalized_jsd(s, t, beta=0.0)):
        s = s0.clone().requires_grad_()
        loss = loss_fn(s)
        assert math.isfinite(loss.item()) and loss.item() == pytest.approx(want, rel=1e-5)
        loss.backward()
        assert torch.isfinite(s.grad).all()
    s = s0.clone().requires_grad_()  # the JSD: m = (p + q) / 2 has mass wherever the student has
    loss = C.generalized_jsd(s, t, beta=0.5)
    m = 0.5 * torch.softmax(t, -1)[0] + 0.5 * torch.softmax(s0, -1)[0]
    qq = torch.softmax(s0, -1)[0]
    want_jsd = 0.5 * float((p * (p / m[[0, 1, 3]]).log()).sum()) + 0.5 * float((qq * (qq / m).log()).sum())
    assert loss.item() == pytest.approx(want_jsd, rel=1e-5)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    assert C.kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)  # a teacher against itself, -inf and all


def test_pruning_dead_heads_changes_nothing_and_the_smaller_model_reloads(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    model = make_tiny_model(tok, seed=4).eval()
    with torch.no_grad():  # heads 1 and 3 of every layer write nothing: they are the least important
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 32:64] = 0.0
            layer.self_attn.o_proj.weight[:, 96:128] = 0.0
    assert (C.head_importance(model).argsort(1)[:, :2].sort(1).values == T([1, 3])).all()
    pruned = C.prune_heads(model, 2)
    assert pruned.model.layers[0].self_attn.q_proj.out_features == 64 and pruned.config.num_attention_heads == 2
    assert count_parameters(pruned) < count_parameters(model)
    ids = torch.randint(10, 60, (2, 9))
    with torch.no_grad():
        assert torch.allclose(pruned(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
        save_model(pruned, tok, tmp_path / "pruned")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
        assert torch.allclose(again(input_ids=ids).logits, pruned(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(ValueError, match="keep must be between 1 and 3"):
        C.prune_heads(model, 4)
    with pytest.raises(ValueError, match=r"hidden size \(128\) must be a multiple of the heads kept \(3\)"):
        C.prune_heads(model, 3)


# ---------------------------------------------------------------- measuring


def test_gradient_checkpointing_saves_fewer_activations(tok, teacher, examples):
    trade = C.checkpointing_trade(teacher, tok, examples, batch_size=8, repeats=1)
    assert 0 < trade["saved_mb_ckpt"] < 0.5 * trade["saved_mb"], trade
    assert trade["seconds"] > 0 and trade["seconds_ckpt"] > 0
    assert not any(getattr(m, "gradient_checkpointing", False) for m in teacher.modules())  # on a copy


def test_measure_latency_times_every_model(tok, teacher):
    out = C.measure_latency({"teacher": teacher, "student": C.make_student(teacher, 1)}, tok, new_tokens=4,
                            repeats=1, warmup=0)
    assert set(out) == {"teacher", "student"} and all(v > 0 for v in out.values())
