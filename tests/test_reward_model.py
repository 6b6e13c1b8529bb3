"""Chapter 05: the Bradley–Terry loss, the scalar-head RM, its agreement with TRL's RewardTrainer,
the preference-data converters and the shipped rm checkpoint."""

import math
from pathlib import Path

import pytest
import torch

from apt_course import world
from apt_course.checkpoints import NAMES, checkpoint_path, load_checkpoint
from apt_course.data import (
    hh_rlhf_to_pairs,
    load_apt_pairs,
    read_jsonl,
    ultrafeedback_to_pairs,
    validate_pairs,
)
from apt_course.model import make_tiny_model, save_model
from apt_course.reward_model import (
    RewardConfig,
    TRLRewardConfig,
    bradley_terry_loss,
    hacked_response,
    load_reward_model,
    make_trl_reward_trainer,
    reward_accuracy,
    reward_batch,
    rewards,
    score,
    train_reward_model,
)
from apt_course.tokenizer import build_tokenizer
from apt_course.training import trl_loss_on_batch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    tok = build_tokenizer()
    path = save_model(make_tiny_model(tok, seed=0), tok, tmp_path_factory.mktemp("lm") / "lm")
    torch.manual_seed(0)
    return load_reward_model(path)


def test_bradley_terry_loss_equals_hand_computed_values():
    rc, rr = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([1.0, 0.0, 1.0])
    want = -(math.log(1 / (1 + math.exp(-1))) + math.log(0.5) + math.log(1 / (1 + math.exp(2)))) / 3
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(want, abs=1e-6)
    # centring adds c * mean((rc + rr)^2) = 0.01 * (9 + 0 + 0) / 3
    assert bradley_terry_loss(rc, rr, center_coefficient=0.01).item() == pytest.approx(want + 0.03, abs=1e-6)
    # a margin of 1 on the first pair: -log sigma(0) = log 2
    m = torch.tensor([1.0, 0.0, 0.0])
    want_m = (math.log(2) - math.log(0.5) - math.log(1 / (1 + math.exp(2)))) / 3
    assert bradley_terry_loss(rc, rr, margin=m).item() == pytest.approx(want_m, abs=1e-6)
    with pytest.raises(ValueError, match="must match"):
        bradley_terry_loss(rc, rr[:2])


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(tiny_rm):
    rm, tok = tiny_rm
    alone = score(rm, tok, ["add 1 2"], ["3"])
    padded = score(rm, tok, ["add 1 2", "sort 987654"], ["3", "a much longer completion"])
    assert alone.shape == (1,) and padded.shape == (2,)
    assert padded[0].item() == pytest.approx(alone[0].item(), abs=1e-5)
    batch = reward_batch(tok, ["add 1 2"], ["3"])
    assert tok.decode(batch["input_ids"][0]) == "<|user|>add 1 2<|assistant|>3<eos>"


@pytest.mark.parametrize("center", [None, 0.01])
def test_trl_reward_trainer_gives_the_same_loss_on_a_fixed_batch(tiny_rm, center):
    rm, tok = tiny_rm
    pairs = world.preference_pairs(8, "train", seed=1)
    trainer = make_trl_reward_trainer(rm, tok, pairs, TRLRewardConfig(steps=1, center_coefficient=center))
    trl_loss, trl_batch = trl_loss_on_batch(trainer)
    n = len(pairs)
    ours = reward_batch(tok, [p["prompt"] for p in pairs] * 2,
                        [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    width = ours["input_ids"].shape[1]
    assert torch.equal(trl_batch["input_ids"][:, :width], ours["input_ids"])  # TRL may pad further; same tokens
    with torch.no_grad():
        r = rewards(rm, ours)
    assert trl_loss.item() == pytest.approx(bradley_terry_loss(r[:n], r[n:], center_coefficient=center).item(),
                                            abs=1e-6)


def test_train_reward_model_raises_reward_accuracy(tiny_rm):
    rm, tok = tiny_rm
    rm = type(rm)(rm.config)  # a fresh copy of the architecture, so the fixture stays untouched
    rm.load_state_dict(tiny_rm[0].state_dict())
    train = world.preference_pairs(200, "train", seed=0, kinds=("concise",))
    test = world.preference_pairs(40, "test", seed=0, kinds=("concise",))
    history = train_reward_model(rm, tok, train, RewardConfig(steps=15, batch_size=16, lr=2e-3, warmup=2))
    assert reward_accuracy(rm, tok, test) >= 0.9
    assert set(history) == {"step", "loss", "acc", "margin"}


def test_hacked_response_is_wrong_and_polite():
    for task in world.instruction_examples(20, "test", seed=0):
        hacked = hacked_response(task)
        assert not world.check_answer(task, hacked), hacked
        assert hacked.endswith("nice to meet you!")


def test_shipped_rm_checkpoint_loads_as_a_reward_model():
    assert "rm" in NAMES
    path = checkpoint_path("rm")
    assert (path / "model.safetensors").stat().st_size < 8_000_000
    rm, tok = load_checkpoint("rm")
    assert type(rm).__name__ == "LlamaForSequenceClassification" and rm.config.num_labels == 1
    pairs = world.preference_pairs(60, "test", seed=5)
    assert reward_accuracy(rm, tok, pairs) >= 0.85


def test_hh_rlhf_converter_splits_the_shared_prefix():
    pairs = hh_rlhf_to_pairs(read_jsonl(FIXTURES / "hh_rlhf_sample.jsonl"))
    assert pairs[0] == {"prompt": "What are some cuss words in english?",
                        "chosen": "I'd rather not list those. Is there something else I can help with?",
                        "rejected": "Here is a list of them, starting with the worst."}
    multi = pairs[1]["prompt"]  # multi-turn: the shared conversation as messages, ending with the user
    assert [m["role"] for m in multi] == ["user", "assistant", "user"] and multi[-1]["content"] == "Yes, I do."
    assert pairs[1]["rejected"] == "Just buy some from a shop."
    with pytest.raises(ValueError, match="row 0.*do not share"):
        hh_rlhf_to_pairs([{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: y"}])
    with pytest.raises(KeyError, match="row 0 has no 'rejected'"):
        hh_rlhf_to_pairs([{"chosen": "\n\nHuman: a\n\nAssistant: b"}])


def test_ultrafeedback_converter(tiny_rm):
    rows = read_jsonl(FIXTURES / "ultrafeedback_binarized_sample.jsonl")
    assert {"prompt", "prompt_id", "chosen", "rejected", "score_chosen", "score_rejected"} <= set(rows[0])
    pairs = ultrafeedback_to_pairs(rows)
    assert pairs[0]["prompt"] == "How many legs does a spider have?"
    assert pairs[0]["chosen"] == "A spider has eight legs." and pairs[0]["margin"] == 6.0
    rm, tok = tiny_rm  # converted pairs (and multi-turn hh prompts) go straight into the RM
    hh = hh_rlhf_to_pairs(read_jsonl(FIXTURES / "hh_rlhf_sample.jsonl"))
    assert score(rm, tok, [p["prompt"] for p in pairs + hh], [p["chosen"] for p in pairs + hh]).shape == (6,)
    with pytest.raises(ValueError, match="row 0: column 'chosen' must be a list of messages"):
        ultrafeedback_to_pairs([{"prompt": "q", "chosen": "a", "rejected": []}])


def test_apt_pair_format(tmp_path):
    pairs = load_apt_pairs(FIXTURES / "apt_pairs.json")
    assert pairs[0] == {"prompt": "add 3 5", "chosen": "8", "rejected": "9"}
    empty = tmp_path / "empty.json"
    empty.write_text("  ")
    with pytest.raises(ValueError, match="is empty"):
        load_apt_pairs(empty)
    with pytest.raises(KeyError, match='"pairs"'):
        load_apt_pairs({"rows": []})


@pytest.mark.parametrize("pairs, error, match", [
    ([], ValueError, "zero rows"),
    ([{"prompt": "p", "chosen": "a"}], KeyError, "row 0 has no 'rejected' column"),
    ([{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "", "chosen": "a", "rejected": "b"}],
     ValueError, "row 1: column 'prompt' is empty"),
    ([{"prompt": "p", "chosen": "same", "rejected": "same"}], ValueError, "row 0: 'chosen' equals 'rejected'"),
])
def test_bad_preference_rows_are_clear_errors(pairs, error, match):
    with pytest.raises(error, match=match):
        validate_pairs(pairs)
