"""Chapter 09: GRPO from scratch against hand-computed values and against TRL's GRPOTrainer."""

import copy
import math
from pathlib import Path

import pytest
import torch

from apt_course import data, rewards, world
from apt_course.grpo import (
    ExpertIterationConfig,
    GRPOConfig,
    RewardFunctionError,
    check_reward_functions,
    expert_iteration,
    group_advantages,
    grpo_loss,
    kl_k3,
    pass_at_k,
    score_completions,
    train_grpo,
)
from apt_course.lm import completion_logprobs, prompt_rows, sample_groups
from apt_course.model import make_tiny_model

FIXTURES = Path(__file__).parent / "fixtures"


# ---------------------------------------------------------------- advantages, KL, loss by hand

def test_group_advantages_by_hand():
    adv = group_advantages([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0], 4)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    want = torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4)
    assert torch.allclose(adv[:4], want, atol=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4)), "a group whose rewards tie carries no signal"
    assert torch.allclose(group_advantages([1.0, 3.0], 2, scale=False), torch.tensor([-1.0, 1.0]))
    batch = group_advantages([1.0, 3.0, 0.0, 0.0], 2, scale="batch")
    std = torch.tensor([1.0, 3.0, 0.0, 0.0]).std()
    assert torch.allclose(batch, torch.tensor([-1.0, 1.0, 0.0, 0.0]) / (std + 1e-4))


def test_group_advantages_skip_nan_rewards():
    adv = group_advantages([1.0, float("nan"), 0.0, 2.0], 4)
    assert adv[1] == 0.0
    assert torch.allclose(adv[[0, 2, 3]], torch.tensor([0.0, -1.0, 1.0]) / (1.0 + 1e-4))


@pytest.mark.parametrize("bad, msg", [(1, "group_size must be"), (3, "do not split")])
def test_group_advantages_bad_input(bad, msg):
    with pytest.raises(ValueError, match=msg):
        group_advantages([1.0, 0.0, 1.0, 0.0], bad)


def test_kl_k3_by_hand_and_unbiased():
    k3 = kl_k3(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert torch.allclose(k3, torch.tensor([0.5 - math.log(0.5) - 1]))
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.2, 0.6])
    exact = (p * (p / q).log()).sum()
    assert torch.allclose((p * kl_k3(p.log(), q.log())).sum(), exact, atol=1e-6)
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_grpo_loss_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logp = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -2.0])
    # on-policy (ratio 1): per-token loss is -A; tokens: 2 with -1, 3 with +2
    assert torch.isclose(grpo_loss(logp, logp, adv, mask, loss_type="grpo")[0], torch.tensor((-1 + 2) / 2))
    assert torch.isclose(grpo_loss(logp, logp, adv, mask, loss_type="dapo")[0], torch.tensor((-2 + 6) / 5))
    assert torch.isclose(grpo_loss(logp, logp, adv, mask, loss_type="dr_grpo", max_completion_length=4)[0],
                         torch.tensor((-2 + 6) / (2 * 4)))
    # ratio 2 on the first sequence (A > 0): clipped at 1.2; ratio 0.5 on the second (A < 0): clipped at 0.8
    old = torch.tensor([[-math.log(2)] * 3, [math.log(2)] * 3])
    loss, stats = grpo_loss(logp, old, adv, mask, loss_type="dapo")
    assert torch.isclose(loss, torch.tensor((-1.2 * 2 + 0.8 * 2 * 3) / 5))
    assert stats["clip_fraction"] == 1.0
    # the KL term: beta * ratio * k3 (TRL's bias correction) or beta * k3
    ref = torch.full((2, 3), math.log(0.5))
    k3 = 0.5 - math.log(0.5) - 1
    plain, _ = grpo_loss(logp, logp, torch.zeros(2), mask, ref, beta=0.1, loss_type="dapo", kl_correction=False)
    assert torch.isclose(plain, torch.tensor(0.1 * k3))


def test_grpo_loss_rejects_unknown_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), loss_type="ppo")


# ---------------------------------------------------------------- parity with TRL

ROWS = ([{"prompt": "<|user|>add 1 2<|assistant|>", "answer": "3"}] * 4
        + [{"prompt": "<|user|>sort 21<|assistant|>", "answer": "12"}] * 4)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_match_trl(online_trainer, scale):
    fixed = [1.0, 0.0, 0.0, 1.0, 0.5, None, 0.5, 2.0]

    def fixed_reward(prompts, completions, **kwargs):
        return list(fixed)

    trainer, ds = online_trainer("GRPO", ROWS, [fixed_reward], beta=0.0, scale_rewards=scale)
    out = trainer._generate_and_score_completions([ds[i] for i in range(8)])
    mine = group_advantages([float("nan") if v is None else v for v in fixed], 4, scale)
    assert torch.allclose(out["advantages"], mine, atol=1e-6)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_loss_and_gradient_match_trl(online_trainer, tok, loss_type):
    trainer, _ = online_trainer("GRPO", ROWS, [rewards.correctness_reward], beta=0.1, loss_type=loss_type, epsilon=0.2)
    model = trainer.model
    torch.manual_seed(0)
    batch = sample_groups(model, tok, ["<|user|>add 1 2<|assistant|>", "<|user|>sort 321<|assistant|>"], 4, 6)
    B, T = batch["completion_ids"].shape
    lengths = torch.tensor([1, 2, 3, 4, 5, 6, 6, 3])  # varied lengths so the three aggregations differ
    batch["completion_mask"] = (torch.arange(T)[None] < lengths[:, None]).long()
    with torch.no_grad():
        logp = completion_logprobs(model, batch, "none")
    old, ref, adv = logp + 0.3 * torch.randn(B, T), logp + 0.3 * torch.randn(B, T), torch.randn(B)
    inputs = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    inputs |= {"advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
               "num_items_in_batch": batch["completion_mask"].sum()}
    trl_loss = trainer._compute_loss(model, inputs)
    trl_grad = torch.autograd.grad(trl_loss, model.model.embed_tokens.weight)[0]
    mine, _ = grpo_loss(completion_logprobs(model, batch, "none"), old, adv, batch["completion_mask"], ref, beta=0.1,
                        loss_type=loss_type, max_completion_length=6)
    my_grad = torch.autograd.grad(mine, model.model.embed_tokens.weight)[0]
    assert torch.allclose(trl_loss, mine, atol=1e-6), (trl_loss.item(), mine.item())
    assert torch.allclose(trl_grad, my_grad, atol=1e-6)


# ---------------------------------------------------------------- reward functions and bad input

def test_verifiable_rewards():
    comps = ["8", " 8", "9", "<think>5+3=8</think>8", "the answer is 8", [{"role": "assistant", "content": "8"}]]
    assert rewards.correctness_reward(None, comps, ["8"] * 6) == [1, 1, 0, 1, 0, 1]
    assert rewards.format_reward(None, comps) == [1, 1, 1, 1, 0, 1]


def test_reward_function_with_wrong_signature_is_a_clear_error():
    def positional(completions):
        return [0.0] * len(completions)

    def no_kwargs(prompts, completions):
        return [0.0] * len(completions)

    def needs_label(prompts, completions, label, **kwargs):
        return [0.0] * len(completions)

    for fn, msg in ((positional, "positional"), (no_kwargs, "no_kwargs.*takes no \\*\\*kwargs"),
                    (needs_label, "needs_label.*requires argument 'label'")):
        with pytest.raises(TypeError, match=msg):
            check_reward_functions([fn], columns=["answer"])
    with pytest.raises(ValueError, match="no reward functions"):
        check_reward_functions([])
    check_reward_functions([rewards.correctness_reward], columns=["answer"])


def test_reward_function_that_raises_names_the_function_and_sample():
    def fragile(prompts, completions, **kwargs):
        return [1.0 / len(c) for c in completions]  # raises on an empty completion

    with pytest.raises(RewardFunctionError, match="'fragile' raised ZeroDivisionError.*sample 2.*completion=''"):
        score_completions([fragile], ["p0", "p1", "p2"], ["a", "bb", ""])


def test_nan_reward_is_reported_and_gets_zero_advantage():
    def picky(prompts, completions, **kwargs):
        return [None if c == "?" else 1.0 for c in completions]

    with pytest.warns(RuntimeWarning, match="'picky'.*sample 1.*completion='\\?'"):
        total, _ = score_completions([picky], ["p"] * 4, ["a", "?", "b", "c"])
    assert math.isnan(total[1]) and group_advantages(total, 4)[1] == 0.0
    with pytest.raises(RewardFunctionError, match="returned 1 rewards for 2"):
        score_completions([lambda prompts, completions, **kw: [1.0]], ["p", "q"], ["a", "b"])


def test_bad_prompt_sets_and_settings(tok):
    with pytest.raises(ValueError, match="prompt set is empty"):
        prompt_rows([])
    with pytest.raises(ValueError, match="row 1"):
        prompt_rows([{"prompt": "add 1 2"}, {"prompt": ""}])
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="ppo")
    model = make_tiny_model(tok)
    with pytest.raises(ValueError, match="beta > 0 needs a frozen ref_model"):
        train_grpo(model, None, tok, ["add 1 2"], [rewards.format_reward], GRPOConfig(beta=0.1))
    with pytest.raises(TypeError, match="takes no \\*\\*kwargs"):
        train_grpo(model, None, tok, ["add 1 2"], [lambda prompts, completions: [0.0]], GRPOConfig())


# ---------------------------------------------------------------- the trainer learns

def test_train_grpo_raises_a_reward_on_a_small_budget(tok):
    def digits(prompts, completions, **kwargs):
        return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in completions]

    torch.set_num_threads(1)
    model = make_tiny_model(tok, seed=0)
    history = train_grpo(model, copy.deepcopy(model), tok, ["add 1 2", "sort 321", "copy ab", "reverse abc"],
                         [digits], GRPOConfig(steps=12, prompts_per_step=4, group_size=8, lr=3e-3,
                                                max_new_tokens=4, num_iterations=2))
    assert set(history) >= {"reward_mean", "reward_std", "frac_zero_std", "completion_length", "kl",
                            "clip_fraction", "reward/digits"}
    first, last = history["reward_mean"][:3], history["reward_mean"][-3:]
    assert sum(last) / 3 > sum(first) / 3 + 0.15, history["reward_mean"]
    assert history["kl"][-1] > 0 and max(history["clip_fraction"]) > 0


def test_eval_fn_measures_without_changing_the_training(tok):
    """``eval_fn`` runs before step 0, every ``eval_every`` steps and at the end, and the trained weights are
    exactly those of a run without it (the measurement neither restarts the optimiser nor draws from its RNG)."""
    def digits(prompts, completions, **kwargs):
        return [float(any(ch.isdigit() for ch in c)) for c in completions]

    torch.set_num_threads(1)
    config = GRPOConfig(steps=4, prompts_per_step=2, group_size=2, lr=3e-3, max_new_tokens=3, seed=1)
    plain, measured = make_tiny_model(tok, seed=0), make_tiny_model(tok, seed=0)
    train_grpo(plain, None, tok, ["add 1 2", "sort 321"], [digits], config)
    seen = []
    history = train_grpo(measured, None, tok, ["add 1 2", "sort 321"], [digits], config,
                         eval_fn=lambda m: seen.append(m.training) or {"n": len(seen)}, eval_every=3)
    assert [e["step"] for e in history["eval"]] == [0, 3, 4] and [e["n"] for e in history["eval"]] == [1, 2, 3]
    assert seen == [False, False, False], "eval_fn should see the model in eval mode"
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), measured.parameters()))
    with pytest.raises(ValueError, match="eval_every"):
        train_grpo(measured, None, tok, ["add 1 2"], [digits], config, eval_fn=lambda m: {}, eval_every=0)


def test_pass_at_k_on_known_samples(tok, monkeypatch):
    """Three prompts, k = 2 samples each: right/right, right/wrong, wrong/wrong -> a sample is right 3/6 of the
    time, and 2 of 3 prompts have at least one right sample."""
    import apt_course.grpo as grpo

    probs = [{"prompt": "copy ab", "answer": "ab"}, {"prompt": "copy cd", "answer": "cd"},
             {"prompt": "copy ef", "answer": "ef"}]
    samples = ["ab", "ab", "cd", "xx", "fe", "e"]
    monkeypatch.setattr(grpo, "generate", lambda *a, num_return_sequences, **k: samples)
    mean, pass_k = pass_at_k(make_tiny_model(tok), tok, probs, 2, world.check_answer)
    assert mean == pytest.approx(0.5) and pass_k == pytest.approx(2 / 3)


# ---------------------------------------------------------------- real datasets (GPU profile) on fixtures

def test_gsm8k_converter_on_the_real_schema():
    rows = data.load_prompts(FIXTURES / "gsm8k_sample.jsonl")
    assert [r["answer"] for r in rows] == ["72", "10", "1245", "-2"]
    assert rows[0]["prompt"].startswith("Natalia sold clips") and "####" in rows[0]["system"]
    with pytest.raises(ValueError, match="row 0.*no '####'"):
        data.gsm8k_to_rows([{"question": "q", "answer": "just 5"}])
    with pytest.raises(KeyError, match="row 0 lacks"):
        data.gsm8k_to_rows([{"problem": "q", "solution": "5"}])


def test_math_answer_checker():
    comps = ["so 48+24=72\n#### 72", "The answer is \\boxed{1,245}.", "I think 3 then 10", "#### 10.0", "no idea"]
    assert rewards.math_correctness_reward(None, comps, ["72", "1245", "10", "10", "1"]) == [1, 1, 1, 1, 0]
    assert rewards.math_format_reward(None, comps) == [1, 0, 0, 1, 0]


def test_strict_and_lenient_parsing():
    """Strict: the reply is the answer and nothing else (a full stop aside); lenient: the answer can be found in it
    (a numeric answer as the reply's last number, a word answer as one of its words); lenient accepts all strict does."""
    cases = [  # (reply, answer, strict, lenient)
        ("27", "27", True, True), ("27.", "27", True, True), ("27.0", "27", True, True),
        ("14 + 13 = 27", "27", False, True), ("27 or 28", "27", False, False),
        ("<think>7+20</think>27", "27", True, True), ("cba", "cba", True, True),
        ("um, well, let me think. i guess it is cba, maybe.", "cba", False, True),
        ("i guess it is cbax", "cba", False, False), ("abc", "cba", False, False), ("", "cba", False, False),
    ]
    for reply, answer, strict, lenient in cases:
        assert rewards.strict_correct(reply, answer) is strict, (reply, answer)
        assert rewards.lenient_correct(reply, answer) is lenient, (reply, answer)


def test_graded_replies_grades_one_set_of_greedy_replies_three_ways(tok, monkeypatch):
    import apt_course.grpo as grpo

    rows = [{"prompt": "copy ab", "answer": "ab"}, {"prompt": "copy cd", "answer": "cd"},
            {"prompt": "copy ef", "answer": "ef"}, {"prompt": "copy gh", "answer": "gh"}]
    replies = ["ab", "it is cd, maybe.", "fe", "gh."]
    monkeypatch.setattr(grpo, "generate", lambda *a, **k: replies)
    graded = grpo.graded_replies(make_tiny_model(tok), tok, rows, world.check_answer)
    assert graded == {"acc": 0.25, "strict": 0.5, "lenient": 0.75, "replies": replies}


def test_apt_prompts_format():
    rows = data.load_prompts(FIXTURES / "apt_prompts.json")
    assert rows[0] == {"prompt": "add 3 5", "answer": "8"} and rows[2]["system"].startswith("owner=")
    plain = data.load_prompts(FIXTURES / "apt_prompts_plain.json")
    assert [r["prompt"] for r in plain] == ["hello, i am ann", "add 2 2", "copy abc"]
    with pytest.raises(ValueError, match="prompts\\[1\\]"):
        data.apt_prompts_to_rows({"prompts": ["ok", {"text": "no prompt key"}]})
    with pytest.raises(ValueError, match="APT prompts format"):
        data.apt_prompts_to_rows({"pairs": []})


def test_gpu_path_on_a_locally_saved_model(tiny_path, monkeypatch):
    """The notebook's PROFILE = "gpu" branch: load_model + GSM8K rows + math rewards, on a local folder."""
    from apt_course.data import load_grpo_data
    from apt_course.profiles import get_profile, load_model

    # the Hub names replaced by local stand-ins: a saved model folder, a fixture in GSM8K's schema
    profile = get_profile("gpu", model=tiny_path, datasets={"math": str(FIXTURES / "gsm8k_sample.jsonl")})
    model, tokenizer = load_model(profile)
    data = load_grpo_data(profile, n_train=4, n_test=2, seed=0)
    assert data["train"][0]["answer"] == "72" and len(data["test"]) == 2
    history = train_grpo(model, None, tokenizer, data["train"], data["reward_fns"],
                         GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4))
    assert len(history["reward_mean"]) == 1


def test_unbiased_pass_at_k_equals_its_definition():
    """Chen et al.'s estimator = the share of k-subsets of the n samples that hold a correct one, averaged."""
    import itertools

    from apt_course.grpo import unbiased_pass_at_k

    hits = torch.tensor([[1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]],
                        dtype=torch.float32)
    n = hits.shape[1]
    for k in range(1, n + 1):
        brute = sum(sum(any(row[list(s)]) for s in itertools.combinations(range(n), k))
                    / math.comb(n, k) for row in hits.bool())
        assert unbiased_pass_at_k(hits, k) == pytest.approx(brute / len(hits))
    assert unbiased_pass_at_k(hits, 1) == pytest.approx(hits.mean().item())  # pass@1 is a sample's accuracy
    assert unbiased_pass_at_k(hits, n) == pytest.approx(hits.any(1).float().mean().item())
    with pytest.raises(ValueError, match="k must lie in"):
        unbiased_pass_at_k(hits, n + 1)


# ---------------------------------------------------------------- expert iteration (the baseline)

def test_expert_iteration_fine_tunes_on_exactly_the_samples_that_reach_the_threshold(tok, monkeypatch):
    """Each round's SFT data is the round's samples whose total reward is >= τ, nothing else, with their prompts;
    a round where nothing reaches τ trains nothing (the weights stay as they were)."""
    import apt_course.sft as sft

    seen = []
    real_train_sft = sft.train_sft
    monkeypatch.setattr(sft, "train_sft", lambda m, t, ex, cfg: seen.append(ex) or real_train_sft(m, t, ex, cfg))

    def has_digit(prompts, completions, **kwargs):
        return [float(any(ch.isdigit() for ch in c)) for c in completions]

    torch.set_num_threads(1)
    model = make_tiny_model(tok, seed=0)
    prompts = [{"prompt": "add 1 2", "answer": "3"}, {"prompt": "sort 321", "answer": "123"}]
    config = ExpertIterationConfig(rounds=3, prompts_per_round=2, group_size=8, sft_steps=2, batch_size=4, lr=1e-3,
                                   max_new_tokens=4, seed=0)
    history = expert_iteration(model, tok, prompts, [has_digit], config)
    assert history["samples"] == [16, 16, 16] and seen, history
    assert [k for k in history["kept"] if k] == [len(ex) for ex in seen], (history["kept"], [len(e) for e in seen])
    for examples in seen:
        assert examples and all(any(ch.isdigit() for ch in ex["completion"]) for ex in examples)
        assert {ex["prompt"] for ex in examples} <= {"add 1 2", "sort 321"}

    never = make_tiny_model(tok, seed=0)
    before = [p.detach().clone() for p in never.parameters()]
    h = expert_iteration(never, tok, prompts, [lambda prompts, completions, **kw: [0.0] * len(completions)], config)
    assert h["kept"] == [0, 0, 0] and all(math.isnan(x) for x in h["loss"])
    assert all(torch.equal(a, b) for a, b in zip(before, never.parameters()))


def test_expert_iteration_raises_the_reward_it_filters_on(tok):
    """Filtering on "the completion holds a digit" and fine-tuning on the survivors makes digits more likely."""
    def has_digit(prompts, completions, **kwargs):
        return [float(any(ch.isdigit() for ch in c)) for c in completions]

    torch.set_num_threads(1)
    model = make_tiny_model(tok, seed=0)
    config = ExpertIterationConfig(rounds=4, prompts_per_round=4, group_size=8, sft_steps=6, batch_size=8, lr=3e-3,
                                   max_new_tokens=4, seed=0)
    history = expert_iteration(model, tok, ["add 1 2", "sort 321", "copy ab", "reverse abc"], [has_digit], config)
    assert history["reward_mean"][-1] > history["reward_mean"][0] + 0.15, history["reward_mean"]


@pytest.mark.parametrize("field", ["rounds", "prompts_per_round", "group_size", "sft_steps", "batch_size"])
def test_expert_iteration_settings_below_one_are_refused(field):
    with pytest.raises(ValueError, match=field):
        ExpertIterationConfig(**{field: 0})
