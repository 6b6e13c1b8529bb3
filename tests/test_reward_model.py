"""Chapter 05: the Bradley–Terry loss, the scalar-head RM, its agreement with TRL's RewardTrainer,
the preference-data converters, the shipped rm checkpoint, and the smol profile's pairs, recipe and shipped
smol_rm (the last test loads it onto the real SmolLM2: about 20 s, skipped without the real model's packages)."""

import json
import math
import random
import re
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
    SMOL_PAIR_KINDS,
    RewardConfig,
    TRLRewardConfig,
    accuracy_by_kind,
    bradley_terry_loss,
    hacked_response,
    load_reward_model,
    load_smol_reward_model,
    make_trl_reward_trainer,
    reward_accuracy,
    reward_batch,
    reward_margins,
    rewards,
    score,
    smol_hacked_response,
    smol_reward_pairs,
    smol_rm_path,
    train_reward_model,
    wrong_sum,
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
    # score batches rows by length: the rewards still come back in the order asked
    rows = ["a much longer completion than the others", "3", "abc", "a longer one"]
    together = score(rm, tok, ["add 1 2"] * 4, rows, batch_size=2)
    one_by_one = torch.cat([score(rm, tok, ["add 1 2"], [r]) for r in rows])
    assert torch.allclose(together, one_by_one, atol=1e-5)
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


# ---------------------------------------------------------------- the smol profile


def test_wrong_sum_is_never_the_sum():
    rng = random.Random(0)
    for a in range(20):
        for b in range(20):
            w = wrong_sum(a, b, rng)
            assert w != a + b and w >= 0


def test_smol_reward_pairs_kinds_labels_and_splits():
    train, test = smol_reward_pairs("train"), smol_reward_pairs("test", 160, seed=1000)
    assert len(train) == 4 * len(world.english_sums("train"))  # every question once per kind
    assert {k: sum(p["kind"] == k for p in test) for k in SMOL_PAIR_KINDS} == {k: 40 for k in SMOL_PAIR_KINDS}
    validate_pairs(train + test)
    question = lambda p: p["prompt"].split("?")[0]  # noqa: E731
    assert not {question(p) for p in train} & {question(p) for p in test}  # held-out questions
    for p in train:
        right = world.check_bare_answer
        a, b = map(int, question(p).removeprefix("What is ").split(" plus "))
        assert p["answer"] == str(a + b)
        said = [re.search(r"= (\d+)", x).group(1) if "=" in x else x for x in (p["chosen"], p["rejected"])]
        if p["kind"] == "correct":  # bare right over bare wrong
            assert right(p, p["chosen"]) and world.is_bare_number(p["rejected"]) and not right(p, p["rejected"])
        elif p["kind"] == "concise":  # bare right over wordy right
            assert right(p, p["chosen"]) and not world.is_bare_number(p["rejected"]) and said[1] == p["answer"]
        elif p["kind"] == "wordy_right":  # wordy right over bare wrong
            assert said[0] == p["answer"] and not world.is_bare_number(p["chosen"]) and not right(p, p["rejected"])
        else:  # wordy_correct: the same wordy reply, right sum over wrong sum
            assert said[0] == p["answer"] != said[1] and re.sub(r"\d+", "#", p["chosen"]) == re.sub(r"\d+", "#", p["rejected"])
    assert smol_reward_pairs("train", 5, kinds=("concise",))[0]["kind"] == "concise"
    with pytest.raises(ValueError, match="kinds must be some of"):
        smol_reward_pairs("train", kinds=("polite",))


def test_smol_hacked_response_is_a_wrong_number():
    for row in world.english_sums("test", ""):
        hacked = smol_hacked_response(row)
        assert world.is_bare_number(hacked) and not world.check_bare_answer(row, hacked), (row, hacked)
    assert smol_hacked_response({"a": 7, "b": 12}) == "712"


def test_accuracy_by_kind():
    pairs = [{"kind": "x"}, {"kind": "x"}, {"kind": "y"}, {"kind": "y"}]
    got = accuracy_by_kind(torch.tensor([1.0, -1.0, 2.0, 0.0]), pairs)
    assert got == {"x": 0.5, "y": 0.5, "all": 0.5}


def test_load_smol_reward_model_names_the_recipe_when_the_folder_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="build-checkpoints --only smol_rm"):
        load_smol_reward_model(path=tmp_path / "nowhere")


def test_smol_rm_recipe_and_shipped_folder():
    from apt_course.recipes import SMOL_NAMES, SMOL_RM_RECIPE, build

    assert "smol_rm" in SMOL_NAMES and SMOL_RM_RECIPE["lora_rank"] == 8
    with pytest.raises(ValueError, match="smol_rm"):
        build("nonsense", Path("/tmp"))
    path = smol_rm_path()
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"] and config["r"] == 8
    assert not config["base_model_name_or_path"].startswith("/")  # no path of the machine that built it
    assert (path / "adapter_model.safetensors").stat().st_size < 8_000_000  # adapters and head only
    info = json.loads((path / "recipe.json").read_text())
    assert info["recipe"] == SMOL_RM_RECIPE and info["heldout_accuracy"]["all"] >= 0.7


@pytest.fixture(scope="module")
def smol_rm(real_model_packages):
    from filelock import FileLock

    from apt_course.real_model import cache_dir, smol_model_path

    cache_dir().mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir() / ".prepare.lock")):
        smol_model_path(build_if_missing=True)
    return load_smol_reward_model()


def test_shipped_smol_rm_loads_frozen_and_ranks_held_out_pairs(smol_rm):
    rm, tok = smol_rm
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    text = tok.decode(reward_batch(tok, ["What is 7 plus 12?"], ["19"])["input_ids"][0])
    assert text == "<|im_start|>user\nWhat is 7 plus 12?<|im_end|>\n<|im_start|>assistant\n19<|im_end|>"
    assert rm.config.pad_token_id == tok.pad_token_id != tok.eos_token_id  # the head reads the closing <|im_end|>
    test = smol_reward_pairs("test", 80, seed=1000)
    assert reward_accuracy(rm, tok, test) >= 0.65
    margins = reward_margins(rm, tok, [p for p in test if p["kind"] == "correct"])
    assert margins.mean() > 0  # bare right over bare wrong, on average


def test_the_pipelines_reward_model_flag_takes_the_lora_smol_rm(smol_rm):
    """``apt-course train --reward-model data/checkpoints/smol_rm``: the LoRA adapter is accepted by the pre-flight
    check and loaded onto the offline SmolLM2 with the same scores as chapter 05's loader."""
    from apt_course.pipeline import check_reward_model
    from apt_course.reward_model import load_any_reward_model, score

    check_reward_model(str(smol_rm_path()))  # no error
    rm, tok = load_any_reward_model(smol_rm_path())
    prompts, replies = ["What is 7 plus 12?"] * 2, ["19", "23"]
    assert torch.allclose(score(rm, tok, prompts, replies), score(*smol_rm, prompts, replies), atol=1e-4)
