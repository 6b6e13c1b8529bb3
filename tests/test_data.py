"""The data layer: local stand-ins for Hub datasets, TRL formats, the per-profile loaders."""

from pathlib import Path

import pytest

from apt_course import data, world

FIXTURES = Path(__file__).parent / "fixtures"


def test_a_local_file_stands_in_for_a_hub_dataset():
    ds = data.load_hub_dataset(str(FIXTURES / "hh_rlhf_sample.jsonl"), "test[:2]")
    assert len(ds) == 2 and set(ds.column_names) >= {"chosen", "rejected"}


def test_a_saved_dataset_dict_stands_in_with_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"x": i} for i in range(5)]),
                 "test": Dataset.from_list([{"x": 10 + i} for i in range(3)])}).save_to_disk(tmp_path / "ds")
    assert data.load_hub_dataset(str(tmp_path / "ds"), "test[:2]")["x"] == [10, 11]
    with pytest.raises(KeyError, match="has splits"):
        data.load_hub_dataset(str(tmp_path / "ds"), "validation")


def test_a_missing_local_dataset_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_hub_dataset("./no/such/file.jsonl", "train")


def test_preference_pairs_in_both_trl_formats(tok):
    pairs = world.preference_pairs(3, "train", seed=1)
    conv = data.to_trl_preference_dataset(pairs)
    assert conv[0]["prompt"] == [{"role": "user", "content": pairs[0]["prompt"]}]
    assert conv[0]["chosen"] == [{"role": "assistant", "content": pairs[0]["chosen"]}]
    explicit = data.to_trl_preference_dataset(pairs, tok)
    assert explicit[0]["prompt"] == tok.apply_chat_template(conv[0]["prompt"], tokenize=False,
                                                            add_generation_prompt=True)
    with pytest.raises(KeyError, match="no 'rejected' column"):
        data.to_trl_preference_dataset([{"prompt": "hi", "chosen": "a"}])


def test_tiny_loaders_use_held_out_splits():
    train, test = data.load_sft_data("tiny", n_train=50, n_test=20, seed=3)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert all(world.split_of(r["prompt"]) == "test" for r in test)
    rl = data.load_rlhf_data("tiny", n_train=20, n_test=8)
    assert rl["quality"] is world.is_polite and not set(rl["train"]) & set(rl["test"])
    grpo = data.load_grpo_data("tiny", n_train=10, n_test=5)
    assert grpo["checker"](grpo["test"][0], grpo["test"][0]["answer"])
    assert not grpo["checker"](grpo["test"][0], "um, " + grpo["test"][0]["answer"])


def test_a_real_model_without_datasets_runs_the_english_sums():
    from apt_course import data, world
    from apt_course.profiles import get_profile

    smol = get_profile("smol", resolve=False)
    train, test = data.load_sft_data(smol, n_train=50, n_test=10)
    assert len(train) == 50 and len(test) == 10 and train[0]["task"] == "add_en"
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in test)
    pairs = data.load_preference_pairs(smol, "test", n=5)
    assert len(pairs) == 5 and all(world.is_bare_number(p["chosen"]) for p in pairs)
    grpo = data.load_grpo_data(smol, n_train=8, n_test=4)
    row = grpo["test"][0]
    assert grpo["checker"](row, f"{row['a']} + {row['b']} = {row['answer']}")  # the last number is the sum
    assert not grpo["checker"](row, f"{row['a']} + {row['b']} = {int(row['answer']) + 1}")
    assert grpo["reward_fns"][0](None, [row["answer"]], [row["answer"]]) == [1.0]


def test_grpo_task_chooses_sums_or_the_math_dataset_on_a_real_model():
    """Chapter 09's TASK: English sums on any real profile (the gpu one names GSM8K, which a 135M model cannot
    learn from), the math dataset on request; an unknown task is named."""
    import pytest

    from apt_course import data
    from apt_course.profiles import get_profile

    gpu = get_profile("gpu", resolve=False)
    sums = data.load_grpo_data(gpu, n_train=6, n_test=3, task="sums")
    assert len(sums["train"]) == 6 and sums["train"][0]["task"] == "add_en" and sums["sft"] is None
    with pytest.raises(ValueError, match="task must be one of"):
        data.load_grpo_data(gpu, n_train=6, n_test=3, task="gsm9k")
    with pytest.raises(ValueError, match="task must be one of"):
        data.load_grpo_data("tiny", n_train=6, n_test=3, task="sum")
