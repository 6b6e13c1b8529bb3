"""Chapter 12: storm noise, schedules, NEFTune (against transformers' hook), the internalisation curriculum,
the trainer, the data converters, the real-model branch and the sweep script."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apt_course import world
from apt_course.data import (  # noqa: E402  (the chapter's data layer)
    load_storm_data,
    read_reasoning_examples,
    s1k_to_storm,
    storm_record,
    world_to_storm,
)
from apt_course.lm import completion_loss
from apt_course.storm import (
    EULER_GAMMA,
    GUMBEL_VARIANCE,
    StormConfig,
    activate_neftune,
    add_gumbel_noise,
    chain_tokens,
    completion_nll,
    curriculum_stage,
    evaluate_storm,
    explicit_completion,
    gumbel_noise,
    neftune_hook,
    neftune_noise,
    noise_conditions,
    noise_ratio,
    noisy_completion_loss,
    removal_offset,
    removed_steps,
    run_real_profile,
    staged_completion,
    storm_target,
    token_stage,
    token_staged_completion,
    train_storm,
)
from apt_course.world import perturb_prompt  # noqa: E402


def heldout_sums(n, seed=1000, digits=2):
    return world_to_storm(world.heldout_sums(n, seed=seed, digits=digits))


ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"


def _logits_and_labels(seed=0, B=3, T=7, V=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100  # prompt
    labels[0, -1] = -100  # padding
    return logits, labels


# ---------------------------------------------------------------- noise

def test_ratio_zero_is_plain_cross_entropy():
    logits, labels = _logits_and_labels()
    assert torch.allclose(noisy_completion_loss(logits, labels, 0.0), completion_loss(logits, labels), atol=1e-6)
    assert torch.equal(add_gumbel_noise(logits, 0.0), logits)
    assert not torch.allclose(noisy_completion_loss(logits, labels, 0.3, torch.Generator().manual_seed(0)),
                              completion_loss(logits, labels))


@pytest.mark.parametrize("ratio", [0.1, 0.3, 1.0])
def test_gumbel_mean_shift_is_gamma_times_ratio(ratio):
    n = 400_000
    shift = (add_gumbel_noise(torch.zeros(n), ratio, torch.Generator().manual_seed(1)).double())
    se_mean = ratio * math.sqrt(GUMBEL_VARIANCE / n)
    assert abs(shift.mean().item() - EULER_GAMMA * ratio) < 5 * se_mean
    # sample variance of a Gumbel: Var(s^2) ~ sigma^4 (kurtosis - 1) / n, kurtosis 5.4
    var = ratio**2 * GUMBEL_VARIANCE
    assert abs(shift.var().item() - var) < 5 * var * math.sqrt(4.4 / n)


def test_mean_shift_changes_neither_loss_nor_gradient():
    logits, labels = _logits_and_labels(1)
    keep = labels[:, 1:] != -100
    z1 = logits.clone().requires_grad_(True)
    loss = noisy_completion_loss(z1, labels, 0.7, torch.Generator().manual_seed(5))
    loss.backward()
    z2 = logits.clone().requires_grad_(True)
    noisy = add_gumbel_noise(z2[:, :-1][keep], 0.7, torch.Generator().manual_seed(5), centered=True)
    centred = torch.nn.functional.cross_entropy(noisy, labels[:, 1:][keep])
    centred.backward()
    assert torch.allclose(loss, centred, atol=1e-6)
    assert torch.allclose(z1.grad, z2.grad, atol=1e-6)


def test_gumbel_noise_is_finite_reproducible_and_gumbel_max_samples_softmax():
    g = gumbel_noise((1000,), torch.Generator().manual_seed(0))
    assert torch.isfinite(g).all()
    assert torch.equal(g, gumbel_noise((1000,), torch.Generator().manual_seed(0)))
    # argmax(z + g) is a sample of softmax(z): Gumbel noise at inference is sampling at T = 1
    z = torch.tensor([1.0, 0.0, -1.0, 2.0])
    n = 40_000
    picks = (z + gumbel_noise((n, 4), torch.Generator().manual_seed(2))).argmax(-1)
    freq = torch.bincount(picks, minlength=4).double() / n
    p = torch.softmax(z.double(), -1)
    assert torch.all((freq - p).abs() < 5 * torch.sqrt(p * (1 - p) / n))


@pytest.mark.parametrize("schedule, want", [("cosine", (0.3, 0.15, 0.0)), ("linear", (0.3, 0.15, 0.0)),
                                            ("constant", (0.3, 0.3, 0.3))])
def test_schedules_at_0_half_1(schedule, want):
    got = [noise_ratio(t, 0.3, schedule) for t in (0.0, 0.5, 1.0)]
    assert got == pytest.approx(want, abs=1e-12)
    # cosine stays above linear in the first half (the storm lasts longer), below it in the second
    assert noise_ratio(0.25, 0.3, "cosine") > noise_ratio(0.25, 0.3, "linear")
    assert noise_ratio(0.75, 0.3, "cosine") < noise_ratio(0.75, 0.3, "linear")


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.3", None])
def test_bad_ratio_is_refused(bad):
    with pytest.raises(ValueError, match="r0 must be a number in"):
        noise_ratio(0.5, bad, "cosine")
    with pytest.raises(ValueError, match="r0 must be"):
        StormConfig(r0=bad)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="unknown noise schedule 'cosin'"):
        noise_ratio(0.5, 0.3, "cosin")
    with pytest.raises(ValueError, match="unknown noise schedule"):
        StormConfig(schedule="exponential")
    with pytest.raises(ValueError, match="progress t must lie in"):
        noise_ratio(1.5, 0.3, "linear")
    with pytest.raises(ValueError, match="cot must be one of"):
        StormConfig(cot="internalize-cot")
    with pytest.raises(ValueError, match="n_stages"):
        StormConfig(n_stages=0)
    with pytest.raises(ValueError, match="neftune_alpha"):
        StormConfig(neftune_alpha=-1)
    with pytest.raises(ValueError, match="ratio must be"):
        noisy_completion_loss(*_logits_and_labels(), 2.0)


# ---------------------------------------------------------------- NEFTune against transformers' hook

def test_neftune_matches_transformers_hook():
    neftune = pytest.importorskip("transformers.integrations.neftune")
    emb = torch.nn.Embedding(20, 16)
    ids = torch.randint(0, 20, (3, 9), generator=torch.Generator().manual_seed(0))
    emb.neftune_noise_alpha = 5.0
    emb.train()
    out = emb(ids)
    torch.manual_seed(123)
    theirs = neftune.neftune_post_forward_hook(emb, (ids,), out)
    torch.manual_seed(123)
    ours = neftune_hook(5.0)(emb, (ids,), out)
    assert torch.allclose(ours, theirs, atol=1e-7)
    bound = 5.0 / math.sqrt(9 * 16)  # alpha / sqrt(L d)
    noise = ours - out
    assert noise.abs().max() <= bound + 1e-7
    assert noise.abs().max() > 0.9 * bound  # uniform over the whole interval
    emb.eval()
    assert torch.equal(neftune.neftune_post_forward_hook(emb, (ids,), out), out)
    assert torch.equal(neftune_hook(5.0)(emb, (ids,), out), out)
    a = neftune_noise(out, 5.0, torch.Generator().manual_seed(1))
    assert torch.equal(a, neftune_noise(out, 5.0, torch.Generator().manual_seed(1)))


def test_activate_neftune_only_in_training(tiny_path):
    from apt_course.model import load_pretrained

    model, tok = load_pretrained(tiny_path)
    ids = torch.tensor([[5, 6, 7, 8]])
    model.eval()
    clean = model(input_ids=ids).logits
    handle = activate_neftune(model, 5.0, torch.Generator().manual_seed(0))
    assert torch.equal(model(input_ids=ids).logits, clean), "NEFTune is off at inference"
    model.train()
    assert not torch.allclose(model(input_ids=ids).logits, clean)
    handle.remove()
    assert torch.allclose(model(input_ids=ids).logits, clean, atol=1e-6)


# ---------------------------------------------------------------- the curriculum

def test_curriculum_removes_steps_stage_by_stage():
    rec = storm_record("q", ["a", "b", "c", "d"], "ans", "apt", ";")
    assert [removed_steps(4, s, 4) for s in range(5)] == [0, 1, 2, 3, 4]
    assert [removed_steps(4, s, 2) for s in range(3)] == [0, 2, 4]
    targets = [staged_completion(rec, removed_steps(4, s, 4)) for s in range(5)]
    assert targets == ["<think>a;b;c;d</think>ans", "<think>b;c;d</think>ans", "<think>c;d</think>ans",
                       "<think>d</think>ans", "ans"]
    assert [curriculum_stage(t, 2) for t in (0.0, 0.3, 0.34, 0.66, 0.67, 1.0)] == [0, 0, 1, 1, 2, 2]
    stages = [curriculum_stage(i / 99, 4) for i in range(100)]
    assert stages == sorted(stages) and set(stages) == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError):
        removed_steps(4, 5, 4)


def test_token_internalisation_removes_tokens_as_deng_et_al(tok):
    rec = storm_record("add 37 24", ["7+4=11", "3+2+1=6"], "61", "tiny-world", ";")
    assert chain_tokens(rec, tok) == len("7+4=11;3+2+1=6")  # the tiny tokenizer: a token per character
    assert token_staged_completion(rec, tok, 0) == explicit_completion(rec)
    assert token_staged_completion(rec, tok, 3) == "<think>=11;3+2+1=6</think>61"
    assert token_staged_completion(rec, tok, 14) == token_staged_completion(rec, tok, 99) == "61"
    # the stage runs at a constant rate and reaches the last (chain gone) at removal_end, then stays there
    assert [token_stage(t, 4, 0.5) for t in (0.0, 0.12, 0.13, 0.25, 0.49, 0.5, 1.0)] == [0, 0, 1, 2, 3, 4, 4]
    with pytest.raises(ValueError):
        token_staged_completion(rec, tok, -1)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        storm_target(rec, "internalise_tokens", 1, 4)


def test_removal_smoothing_follows_its_law():
    """P(o) ∝ exp(-λ o): a geometric law with P(0) = 1 - e^(-λ) and mean 1 / (e^λ - 1)."""
    import random

    for lam in (0.5, 4.0):
        rng = random.Random(0)
        draws = [removal_offset(rng, lam) for _ in range(40000)]
        assert min(draws) == 0
        assert abs(draws.count(0) / len(draws) - (1 - math.exp(-lam))) < 0.01
        assert abs(sum(draws) / len(draws) - 1 / (math.exp(lam) - 1)) < 0.03
    assert removal_offset(random.Random(0), 0.0) == 0
    with pytest.raises(ValueError):
        removal_offset(random.Random(0), -1.0)
    with pytest.raises(ValueError, match="removal_end"):
        StormConfig(cot="internalise_tokens", removal_end=0)


def test_the_cot_checkpoint_reasons_on_paper():
    """The shipped ``cot`` checkpoint writes its chain and gets at least 90 % of held-out 3-digit sums right."""
    from apt_course.checkpoints import load_checkpoint
    from apt_course.recipes import cot_heldout_accuracy

    model, tok = load_checkpoint("cot")
    acc = cot_heldout_accuracy(model, tok, n=100)
    assert acc["3_digit"] >= 0.9 and acc["2_digit"] >= 0.9, acc


def test_world_records_match_the_world_format():
    probs = world.cot_problems(5, "train", seed=0)
    recs = world_to_storm(probs)
    for p, r in zip(probs, recs):
        assert explicit_completion(r) == p["completion_cot"]
        assert staged_completion(r, len(r["steps"])) == p["completion_answer"]
        assert {"problem", "cot_explicit", "answer", "source"} <= set(r)


def test_heldout_sums_and_perturbations():
    test = heldout_sums(40, seed=3)
    assert len(test) == 40
    for r in test:
        assert world.split_of(r["problem"]) == "test"
        assert world.split_of(perturb_prompt(r["problem"], "swap")) == "test"
    assert perturb_prompt("add 47 38", "swap") == "add 38 47"
    assert perturb_prompt("add 47 38", "spaces") == "add  47  38"
    with pytest.raises(ValueError, match="unknown perturbation"):
        perturb_prompt("add 1 2", "typo")
    with pytest.raises(ValueError, match="needs a tiny-world sum"):
        perturb_prompt("what is 2+2?", "swap")


def test_english_chain_sums_for_the_real_model():
    rows = world.english_chain_sums(30, "train", seed=4)
    assert len({r["prompt"] for r in rows}) == 30
    for r in rows:
        numbers = [int(x) for x in r["prompt"].removeprefix("What is ").rstrip("?").split(" plus ")]
        assert len(numbers) == 3 and all(10 <= x <= 99 for x in numbers)
        assert r["answer"] == str(sum(numbers)) and r["steps"][-1].endswith("= " + r["answer"])
        assert r["steps"][0] == f"{numbers[0]} + {numbers[1]} = {numbers[0] + numbers[1]}"
        assert world.split_of(r["prompt"]) == "train"
    train, test = load_storm_data("smol", n_train=20, n_test=10, seed=1)
    assert all(world.split_of(r["problem"]) == "test" for r in test)
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    steps = test[0]["steps"]
    assert explicit_completion(test[0]) == f"<think>{steps[0]}; {steps[1]}</think>{test[0]['answer']}"
    with pytest.raises(ValueError, match="at least 2 operands"):
        world.english_chain_sums(3, operands=1)


def test_compare_conditions_with_lora_leaves_the_start_and_trains_adapters(tiny_path):
    from apt_course.model import load_pretrained
    from apt_course.storm import compare_conditions

    model, tok = load_pretrained(tiny_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train = world_to_storm(world.cot_problems(32, "train", seed=0))
    out = compare_conditions(model, tok, train, train[:4], {"a": StormConfig(steps=2, batch_size=4, lr=1e-2)},
                             {"max_new_tokens": 4, "perturbations": ()}, keep_models=True, lora_r=4)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "the start is not trained"
    trained = out["a"]["model"]
    assert hasattr(trained, "peft_config") and any("lora_B" in n and p.abs().sum() > 0
                                                    for n, p in trained.named_parameters())


# ---------------------------------------------------------------- the trainer

def test_trainer_improves_heldout_nll_with_storm_noise():
    from apt_course.checkpoints import load_checkpoint

    model, tok = load_checkpoint("sft")
    train, test = load_storm_data("tiny", n_train=512, n_test=16, seed=0)
    before = completion_nll(model, tok, test, "explicit")
    history = train_storm(model, tok, train, StormConfig(steps=25, batch_size=16, lr=3e-3, r0=0.3, seed=0))
    after = completion_nll(model, tok, test, "explicit")
    assert after < before - 0.3, (before, after)
    assert history["ratio"][0] == pytest.approx(0.3) and history["ratio"][-1] == pytest.approx(0.0)
    assert all(math.isfinite(x) for x in history["loss"] + history["clean_loss"])
    figures = evaluate_storm(model, tok, test, max_new_tokens=24)
    assert set(figures) >= {"acc", "acc_sampled", "acc_swap", "acc_spaces", "tokens_per_answer"}
    assert figures["tokens_per_answer"] > 8, "after explicit-CoT training the model writes its steps"


def test_internalise_walks_through_the_stages_and_neftune_runs(tiny_path):
    from apt_course.model import load_pretrained

    model, tok = load_pretrained(tiny_path)
    train = world_to_storm(world.cot_problems(64, "train", seed=0))
    h = train_storm(model, tok, train, StormConfig(steps=9, batch_size=4, cot="internalise", log_every=1,
                                                   neftune_alpha=5.0, r0=0.5, schedule="constant"))
    assert h["stage"] == sorted(h["stage"]) and h["stage"][0] == 0 and h["stage"][-1] == 2
    assert h["ratio"] == [0.5] * 9
    assert not model.get_input_embeddings()._forward_hooks, "the NEFTune hook is removed after training"


def test_token_internalisation_trains_through_its_stages(tiny_path):
    from apt_course.model import load_pretrained

    model, tok = load_pretrained(tiny_path)
    train = world_to_storm(world.cot_problems(64, "train", seed=0))
    h = train_storm(model, tok, train, StormConfig(steps=10, batch_size=4, cot="internalise_tokens", log_every=1,
                                                   tokens_per_stage=8, removal_end=0.5))
    n_stages = math.ceil(max(chain_tokens(r, tok) for r in train) / 8)
    assert h["stage"] == sorted(h["stage"]) and h["stage"][0] == 0 and h["stage"][-1] == n_stages
    assert h["stage"].index(n_stages) <= 5, "the chain is gone by half-way (removal_end 0.5)"


def test_noise_conditions_cover_schedules_levels_and_neftune():
    names = set(noise_conditions(StormConfig()))
    assert names == {"noise_free", "storm_cosine", "storm_linear", "storm_constant", "storm_cosine_conservative",
                     "storm_cosine_aggressive", "neftune"}
    assert len(noise_conditions(StormConfig(), full_grid=True)) == 1 + 3 * 3 + 1


# ---------------------------------------------------------------- data converters

def test_s1k_converter_on_fixture():
    rows = [json.loads(line) for line in (FIXTURES / "s1k_sample.jsonl").read_text().splitlines()]
    recs = s1k_to_storm(rows)
    assert len(recs) == 4
    assert recs[0]["problem"] == rows[0]["question"]
    assert recs[0]["answer"] == rows[0]["deepseek_attempt"].strip()
    assert recs[0]["steps"][0] == "Okay, I need 17 + 25." and len(recs[0]["steps"]) == 4
    assert recs[0]["source"] == "s1K-1.1/AI-MO/NuminaMath-CoT/synthetic_math"
    assert recs[3]["steps"] == rows[3]["deepseek_thinking_trajectory"].splitlines()  # no blank lines: by line
    assert len(s1k_to_storm(rows, only_graded_correct=True)) == 3  # row 2's DeepSeek attempt is graded "No"
    assert s1k_to_storm(rows, trajectory="gemini")[2]["answer"] == rows[2]["gemini_attempt"]
    v1 = {"question": "q?", "thinking_trajectories": ["step one\n\nstep two"], "attempt": "a", "source_type": "x"}
    assert s1k_to_storm([v1])[0]["steps"] == ["step one", "step two"]


def test_s1k_converter_errors():
    row = json.loads((FIXTURES / "s1k_sample.jsonl").read_text().splitlines()[0])
    with pytest.raises(ValueError, match="zero rows"):
        s1k_to_storm([])
    bad = dict(row)
    del bad["deepseek_attempt"]
    with pytest.raises(KeyError, match=r"row 0 has no column\(s\) \['deepseek_attempt'\]"):
        s1k_to_storm([bad])
    with pytest.raises(ValueError, match="row 1: column 'deepseek_thinking_trajectory' is empty"):
        s1k_to_storm([row, dict(row, deepseek_thinking_trajectory="  ")])
    with pytest.raises(ValueError, match="trajectory must be"):
        s1k_to_storm([row], trajectory="claude")


def test_reasoning_examples_reader(tmp_path):
    recs = read_reasoning_examples(FIXTURES / "apt_reasoning.json")
    assert len(recs) == 3 and recs[0]["steps"][0].startswith("12 pens")
    assert staged_completion(recs[0], 3) == "8 dollars"
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        read_reasoning_examples(empty)
    with pytest.raises(KeyError, match=r"example 1 has no \['cot'\]"):
        read_reasoning_examples({"reasoning_examples": [{"problem": "p", "cot": ["s"], "answer": "a"},
                                                        {"problem": "p", "answer": "a"}]})
    with pytest.raises(KeyError, match=r"no \['answer'\]"):
        read_reasoning_examples({"reasoning_examples": [{"problem": "p", "cot": ["s"]}]})
    with pytest.raises(ValueError, match="'cot' is empty"):
        read_reasoning_examples({"reasoning_examples": [{"problem": "p", "cot": [], "answer": "a"}]})
    with pytest.raises(ValueError, match="holds no examples"):
        read_reasoning_examples({"reasoning_examples": []})
    with pytest.raises(KeyError, match="reasoning_examples"):
        read_reasoning_examples({"examples": []})


# ---------------------------------------------------------------- the notebook's real-model branch

@pytest.mark.parametrize("source", ["s1k", "apt"])
def test_real_profile_branch_with_local_stand_ins(tiny_path, source):
    from apt_course.profiles import get_profile

    profile = get_profile("gpu", model=tiny_path, datasets={"reasoning": str(FIXTURES / "s1k_sample.jsonl")})
    reasoning_file = FIXTURES / "apt_reasoning.json" if source == "apt" else None
    out = run_real_profile(profile, steps=3, lr=1e-3, max_new_tokens=6, reasoning_file=reasoning_file)
    m = out["metrics"]
    assert all(math.isfinite(v) for v in m.values())
    assert m["nll_answer_after"] < m["nll_answer_before"]
    assert out["n_test"] >= 1 and out["n_train"] >= 1


# ---------------------------------------------------------------- the sweep script

def test_sweep_quick_mode_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "storm_sweep.py"), "--quick", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    record = json.loads((tmp_path / "storm_sweep.json").read_text())
    assert set(record["summary"]["cot"]) == {"answer_only", "internalised_steps", "internalised_tokens"}
    assert set(record["summary"]["start"]) >= {"acc", "tokens_per_answer"}
    entry = record["claims"]["noise_vs_noise_free"]["storm_cosine"]["acc"]
    assert entry["verdict"] in ("better", "worse", "no difference detected")
    assert "noise_free" in record["summary"]["storm"] and "neftune" in record["summary"]["storm"]
    assert "## Claims, seed by seed" in (tmp_path / "storm_sweep.md").read_text()
