"""DPO, IPO, SimPO, KTO: hand-computed values, parity with TRL on the same batch, the trainer, bad input."""

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch

from apt_course import data, dpo, world
from apt_course.lm import build_pair_batch
from apt_course.model import load_pretrained, make_tiny_model, save_model
from apt_course.tokenizer import build_tokenizer, chat_prompt, format_prompt, messages_for

FIXTURES = Path(__file__).parent / "fixtures"
T = torch.tensor


def sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module")
def models(tok):
    torch.set_num_threads(1)
    return make_tiny_model(tok, seed=1), make_tiny_model(tok, seed=0)  # policy, reference: they differ


@pytest.fixture(scope="module")
def pairs():
    return world.preference_pairs(6, "train", seed=0)


# ---------------------------------------------------------------- the formulas on fixed numbers

def test_dpo_loss_matches_hand_computation():
    # log-ratios: chosen (1, 0), rejected (-1, 1); beta 0.5 -> logits (1, -0.5)
    loss, rc, rr = dpo.dpo_loss(T([-1.0, -2.0]), T([-3.0, -1.0]), T([-2.0, -2.0]), T([-2.0, -2.0]), beta=0.5)
    want = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    assert rc.tolist() == pytest.approx([0.5, 0.0]) and rr.tolist() == pytest.approx([-0.5, 0.5])


def test_dpo_loss_is_log2_when_policy_equals_reference():
    x = torch.randn(5)
    loss, _, _ = dpo.dpo_loss(x, x - 1, x, x - 1, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)


def test_ipo_loss_matches_hand_computation():
    args = (T([-1.0, -2.0]), T([-3.0, -1.0]), T([-2.0, -2.0]), T([-2.0, -2.0]))
    # h = (2, -1), target 1/(2*0.5) = 1 -> ((1)^2 + (-2)^2) / 2
    assert dpo.ipo_loss(*args, beta=0.5)[0].item() == pytest.approx(2.5)
    # length-normalised (TRL 1.x): h = (1/2 + 1, 0 - 1/2) = (1.5, -0.5) -> (0.25 + 2.25) / 2
    assert dpo.ipo_loss(*args, beta=0.5, len_c=T([2.0, 1.0]), len_r=T([1.0, 2.0]))[0].item() == pytest.approx(1.25)


def test_simpo_loss_matches_hand_computation():
    loss, rc, rr = dpo.simpo_loss(T([-0.5]), T([-1.5]), beta=2.0, gamma=0.5)  # 2 * 1 - 0.5 = 1.5
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-6)
    assert rc.item() == pytest.approx(-1.0) and rr.item() == pytest.approx(-3.0)


def test_kto_loss_matches_hand_computation():
    pi, ref = T([-1.0, -3.0]), T([-2.0, -2.0])  # r = (1, -1)
    loss, rd, ru = dpo.kto_loss(pi, ref, [True, False], kl=0.5, beta=1.0)
    assert loss.item() == pytest.approx(((1 - sig(0.5)) + (1 - sig(1.5))) / 2, abs=1e-6)
    assert rd.tolist() == [1.0] and ru.tolist() == [-1.0]
    # a negative KL estimate is clamped to 0; weights scale each side
    loss, _, _ = dpo.kto_loss(pi, ref, [True, False], kl=-3.0, beta=1.0, desirable_weight=2.0)
    assert loss.item() == pytest.approx((2 * (1 - sig(1.0)) + (1 - sig(1.0))) / 2, abs=1e-6)
    assert dpo.kto_kl(T([-1.0, -2.0]), T([-2.0, -2.0])).item() == pytest.approx(0.5)
    assert dpo.kto_kl(T([-3.0]), T([-2.0])).item() == 0.0


def test_losses_reject_nonpositive_beta():
    x = T([-1.0])
    for bad in (0.0, -0.1):
        with pytest.raises(ValueError, match="beta must be > 0"):
            dpo.dpo_loss(x, x, x, x, bad)
        with pytest.raises(ValueError, match="beta must be > 0"):
            dpo.DPOConfig(beta=bad)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo.DPOConfig(loss_type="dpo")


# ---------------------------------------------------------------- batches and log-probs

def test_pair_batch_layout_and_logps(tok, models, pairs):
    policy, _ = models
    batch = build_pair_batch(tok, pairs)
    assert batch["input_ids"].shape[0] == 2 * len(pairs)
    c, r, lc, lr = dpo.pair_batch_logps(policy, batch)
    # the chosen half scores chosen + EOS after the chat prompt
    assert lc[0].item() == len(pairs[0]["chosen"]) + 1 and lr[0].item() == len(pairs[0]["rejected"]) + 1
    from apt_course.lm import build_batch, completion_logprobs

    one = build_batch(tok, [chat_prompt(pairs[0]["prompt"])], [pairs[0]["chosen"]])
    with torch.no_grad():
        assert c[0].item() == pytest.approx(completion_logprobs(policy, one).item(), abs=1e-4)


# ---------------------------------------------------------------- parity with TRL on the same batch

def _common(tmp_path, n):
    return dict(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, bf16=False, max_steps=1,
                per_device_train_batch_size=n, save_strategy="no", disable_tqdm=True)


@pytest.mark.parametrize("loss_type, sft_weight", [("sigmoid", 0.0), ("ipo", 0.0), ("sigmoid", 0.7)])
def test_dpo_and_ipo_match_trl_dpotrainer(tok, models, pairs, tmp_path, loss_type, sft_weight):
    from trl import DPOConfig, DPOTrainer

    policy, ref = models
    extra = dict(loss_type=[loss_type, "sft"], loss_weights=[1.0, sft_weight]) if sft_weight else \
        dict(loss_type=[loss_type])
    args = DPOConfig(beta=0.2, gradient_checkpointing=False, **extra, **_common(tmp_path, len(pairs)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=data.to_trl_preference_dataset(pairs),
                             processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    mine = build_pair_batch(tok, pairs)
    assert torch.equal(batch["input_ids"], mine["input_ids"])  # same tokens, same layout
    assert torch.equal(batch["completion_mask"], mine["completion_mask"])
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch).item()
        ours = dpo.pair_loss(policy, ref, batch, loss_type, beta=0.2, sft_weight=sft_weight)[0].item()
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)
    assert abs(ours - math.log(2)) > 1e-3  # policy != reference, so the check is not trivial


def test_simpo_matches_trl_cpotrainer(tok, models, pairs, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy, _ = models
    ds = data.to_trl_preference_dataset(pairs, tok)  # explicit prompts, the chat template applied
    args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=0.5, max_length=256,
                     **_common(tmp_path, len(pairs)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = CPOTrainer(model=policy, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch).item()
        ours = dpo.pair_loss(policy, None, build_pair_batch(tok, pairs), "simpo", 2.0, 0.5)[0].item()
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)


def test_kto_matches_trl_ktotrainer(tok, models, pairs, tmp_path):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    policy, ref = models
    rows = dpo.to_unpaired(pairs)
    ds = Dataset.from_list([{"prompt": messages_for(u["prompt"]), "label": u["label"],
                             "completion": [{"role": "assistant", "content": u["completion"]}]} for u in rows])
    args = KTOConfig(beta=0.3, gradient_checkpointing=False, **_common(tmp_path, len(rows)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, batch).item()
        ours = dpo.kto_batch_loss(policy, ref, tok, rows, beta=0.3)[0].item()
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------- the trainer

def test_train_dpo_learns_held_out_preferences(tok):
    torch.manual_seed(0)
    ref = make_tiny_model(tok, seed=0)
    policy = copy.deepcopy(ref)
    train = world.preference_pairs(128, "train", seed=0, kinds=("polite",))
    test = world.preference_pairs(64, "test", seed=0, kinds=("polite",))
    before = dpo.implicit_reward_accuracy(policy, tok, test, ref=ref)
    hist = dpo.train_dpo(policy, ref, tok, train, dpo.DPOConfig(steps=12, batch_size=16, lr=2e-3, beta=0.5))
    after = dpo.implicit_reward_accuracy(policy, tok, test, ref=ref)
    assert before == 0.0  # pi = pi_ref: every implicit-reward margin is exactly 0, nothing is ranked right
    assert after >= 0.9, after
    assert hist["margin"][-1] > hist["margin"][0] and hist["loss"][-1] < hist["loss"][0]
    assert set(hist) >= {"reward_chosen", "reward_rejected", "margin", "reward_acc", "logp_chosen", "logp_rejected"}


@pytest.mark.parametrize("loss_type", ["ipo", "simpo", "kto"])
def test_other_losses_train(tok, loss_type):
    ref = make_tiny_model(tok, seed=0)
    policy = copy.deepcopy(ref)
    train = world.preference_pairs(64, "train", seed=1, kinds=("polite",))
    cfg = dpo.DPOConfig(loss_type=loss_type, steps=6, batch_size=8, lr=2e-3, beta=0.5)
    hist = dpo.train_dpo(policy, None if loss_type == "simpo" else ref, tok, train, cfg)
    assert hist["loss"][-1] < hist["loss"][0] and hist["margin"][-1] > hist["margin"][0]


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("row, match", [
    ({"prompt": "add 1 2", "chosen": "3"}, "row 1 has no 'rejected' column"),
    ({"prompt": "add 1 2", "chosen": " ", "rejected": "4"}, "row 1: column 'chosen' is empty"),
    ({"prompt": "add 1 2", "chosen": "3", "rejected": "3"}, "row 1: 'chosen' equals 'rejected'"),
])
def test_bad_pairs_are_clear_errors(tok, row, match):
    good = {"prompt": "add 1 1", "chosen": "2", "rejected": "3"}
    with pytest.raises((KeyError, ValueError), match=match):
        data.validate_pairs([good, row])
    with pytest.raises((KeyError, ValueError), match=match):
        m = make_tiny_model(tok)
        dpo.train_dpo(m, copy.deepcopy(m), tok, [good, row], dpo.DPOConfig(steps=1))


def test_reference_must_share_the_vocabulary(tok):
    policy = make_tiny_model(tok)
    other = copy.deepcopy(policy)
    other.resize_token_embeddings(len(tok) + 8)
    pairs = world.preference_pairs(4, "train")
    with pytest.raises(ValueError, match="vocabulary has 112 tokens but the policy's has 104"):
        dpo.train_dpo(policy, other, tok, pairs, dpo.DPOConfig(steps=1))
    tok2 = build_tokenizer()
    tok2.add_tokens(["<new>"])
    with pytest.raises(ValueError, match="tokenizer differs"):
        dpo.train_dpo(policy, copy.deepcopy(policy), tok, pairs, dpo.DPOConfig(steps=1), ref_tokenizer=tok2)
    with pytest.raises(ValueError, match="ref is the policy itself"):
        dpo.train_dpo(policy, policy, tok, pairs, dpo.DPOConfig(steps=1))
    with pytest.raises(ValueError, match="needs a reference model"):
        dpo.train_dpo(policy, None, tok, pairs, dpo.DPOConfig(steps=1))


# ---------------------------------------------------------------- measuring and the GPU path

def test_score_reply_and_win_rate_definitions(tok):
    task = {"prompt": "add 3 5", "chosen": "8", "rejected": "9", "answer": "8"}
    assert [dpo.score_reply(task, x) for x in ("8", "um, well, it is 8, maybe.", "9")] == [2, 1, 0]
    hello = {"prompt": "hello, i am bob", "chosen": "hello bob, nice to meet you!", "rejected": "go away, bob."}
    assert [dpo.score_reply(hello, x) for x in ("hello bob, nice to meet you!", "happy to help, bob.",
                                                "go away, bob.")] == [2, 1, 0]
    m = make_tiny_model(tok)
    res = dpo.win_rate(m, m, tok, [task, hello], max_new_tokens=4)
    assert res["ties"] == 2 and res["win_rate"] == 0.5  # a model against itself ties everywhere


def test_gpu_path_loads_a_saved_model_and_trains_on_real_dataset_schemas(tok, tmp_path):
    """The GPU branch: from_pretrained on a folder; hh-rlhf and UltraFeedback rows (fixtures in the real schemas)
    through apt_course.data; multi-turn prompts through the chat template."""
    from apt_course.data import hh_rlhf_to_pairs, read_jsonl, ultrafeedback_to_pairs

    save_model(make_tiny_model(tok), tok, tmp_path / "m")
    model, tokenizer = load_pretrained(tmp_path / "m")
    ref, _ = load_pretrained(tmp_path / "m")
    pairs = hh_rlhf_to_pairs(read_jsonl(FIXTURES / "hh_rlhf_sample.jsonl"))
    pairs += ultrafeedback_to_pairs(read_jsonl(FIXTURES / "ultrafeedback_binarized_sample.jsonl"))
    assert isinstance(pairs[1]["prompt"], list)  # a multi-turn conversation
    assert format_prompt(tokenizer, pairs[1]["prompt"]) == (
        "<|user|>How do I bake bread?<|assistant|>Do you have yeast at home?<eos><|user|>Yes, I do.<|assistant|>")
    assert format_prompt(tokenizer, pairs[0]["prompt"]) == chat_prompt(pairs[0]["prompt"])
    hist = dpo.train_dpo(model, ref, tokenizer, pairs, dpo.DPOConfig(steps=2, batch_size=3))
    assert len(hist["loss"]) == 2 and all(math.isfinite(x) for x in hist["loss"])


def test_the_kl_regularised_optimum_is_dpos_closed_form():
    """Chapter 07's derivation on a discrete case: pi* = pi_ref e^(r/beta) / Z maximises E_pi[r] - beta KL(pi||pi_ref),
    the maximum is beta log Z, any other policy loses exactly beta KL(pi||pi*), and r = beta log(pi*/pi_ref) + beta
    log Z."""
    g = torch.Generator().manual_seed(0)
    beta = 0.7
    ref = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    r = torch.randn(6, generator=g, dtype=torch.float64)

    def objective(pi):
        return (pi * r).sum() - beta * (pi * (pi / ref).log()).sum()

    z = (ref * (r / beta).exp()).sum()
    opt = ref * (r / beta).exp() / z
    assert torch.allclose(objective(opt), beta * z.log())
    assert torch.allclose(r, beta * (opt / ref).log() + beta * z.log())
    for _ in range(20):
        pi = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
        assert objective(pi) < objective(opt)
        assert torch.allclose(objective(opt) - objective(pi), beta * (pi * (pi / opt).log()).sum())


def test_ranking_accuracy_on_known_scores():
    """Three pairs scored once, ranked three ways: by log-probability, per token, and by the implicit reward
    against a reference; the same as implicit_reward_accuracy computes from the models."""
    scores = (torch.tensor([-4.0, -9.0, -3.0]), torch.tensor([-6.0, -8.0, -6.0]),  # chosen, rejected
              torch.tensor([2.0, 3.0, 1.0]), torch.tensor([4.0, 2.0, 2.0]))        # their token counts
    ref = (torch.tensor([-5.0, -12.0, -2.0]), torch.tensor([-5.0, -9.0, -7.0]), None, None)
    assert dpo.ranking_accuracy(scores) == pytest.approx(2 / 3)  # -4 > -6, -9 < -8, -3 > -6
    assert dpo.ranking_accuracy(scores, normalize=True) == pytest.approx(1 / 3)  # -2 < -1.5, -3 > -4, -3 = -3 (a tie is no win)
    # implicit reward: (c - c_ref) vs (r - r_ref): 1 > -1, 3 > 1, -1 < 1
    assert dpo.ranking_accuracy(scores, ref_scores=ref) == pytest.approx(2 / 3)
