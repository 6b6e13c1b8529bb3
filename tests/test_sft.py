"""Chapter 04: the SFT loss, its agreement with TRL's SFTTrainer, LoRA, and the instruction converters."""

import json
import math
from pathlib import Path

import pytest
import torch

from apt_course import world
from apt_course.data import coig_to_sft, load_apt_instructions
from apt_course.lm import build_batch, completion_loss
from apt_course.model import count_parameters, make_tiny_model, save_model
from apt_course.profiles import get_profile, load_model
from apt_course.sft import (
    SFTConfig,
    TRLSFTConfig,
    add_lora,
    make_trl_sft_trainer,
    merge_and_save,
    run_trl_sft,
    to_sft_pairs,
    to_trl_dataset,
    train_sft,
)
from apt_course.training import trl_loss_on_batch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def examples():
    return world.instruction_examples(12, "train", seed=3)


def read_jsonl(name):
    return [json.loads(line) for line in (FIXTURES / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def test_completion_loss_equals_hand_computed_value():
    # vocab of 3, one row: positions 0..3; labels -100 on the prompt (pos 0, 1), completion = tokens at 2, 3
    logits = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [9.0, 9.0, 9.0]]])
    labels = torch.tensor([[-100, -100, 0, 1]])
    # token 2 (= 0) is predicted by position 1: p = e^2 / (e^2 + 2); token 3 (= 1) by position 2: e / (e + 2)
    want = -(math.log(math.exp(2) / (math.exp(2) + 2)) + math.log(math.e / (math.e + 2))) / 2
    assert completion_loss(logits, labels).item() == pytest.approx(want, abs=1e-6)


def test_prompt_tokens_are_masked_in_the_sft_batch(tok):
    prompts, completions = to_sft_pairs([{"prompt": "add 3 5", "answer": "8"}])
    batch = build_batch(tok, prompts, completions)
    learned = batch["input_ids"][batch["labels"] != -100]
    assert tok.decode(learned) == "8<eos>"


@pytest.mark.parametrize("conversational", [False, True])
def test_trl_sft_sees_the_same_tokens_and_gives_the_same_loss(tok, examples, conversational):
    model = make_tiny_model(tok, seed=0)
    trainer = make_trl_sft_trainer(model, tok, examples, TRLSFTConfig(steps=1, conversational=conversational))
    trl_loss, trl_batch = trl_loss_on_batch(trainer)
    prompts, completions = to_sft_pairs(examples)
    ours = build_batch(tok, prompts, completions)
    assert torch.equal(trl_batch["input_ids"], ours["input_ids"])
    assert torch.equal(trl_batch["labels"], ours["labels"])  # completion-only: prompt tokens are -100 in both
    with torch.no_grad():
        our_loss = completion_loss(model(input_ids=ours["input_ids"], attention_mask=ours["attention_mask"]).logits,
                                   ours["labels"])
    assert trl_loss.item() == pytest.approx(our_loss.item(), abs=1e-6)


def test_trl_datasets_have_the_two_formats(examples):
    text = to_trl_dataset(examples[:2])
    conv = to_trl_dataset(examples[:2], conversational=True)
    assert text[0]["prompt"].startswith("<|user|>") and text[0]["completion"] == examples[0]["answer"]
    assert conv[0]["prompt"] == [{"role": "user", "content": examples[0]["prompt"]}]
    assert conv[0]["completion"] == [{"role": "assistant", "content": examples[0]["answer"]}]


def test_train_sft_lowers_the_loss_on_a_small_budget(tok):
    model = make_tiny_model(tok, seed=0)
    data = world.instruction_examples(200, "train", seed=0, tasks=("copy",))
    prompts, completions = to_sft_pairs(data[:64])
    batch = build_batch(tok, prompts, completions)

    def loss():
        with torch.no_grad():
            return completion_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]).item()

    before = loss()
    history = train_sft(model, tok, data, SFTConfig(steps=15, batch_size=16, lr=5e-3, warmup=2, log_every=5))
    assert loss() < before - 1.0, (before, loss())
    assert len(history["loss"]) == len(history["step"]) > 1


def test_run_trl_sft_learns(tok):
    model = make_tiny_model(tok, seed=0)
    data = world.instruction_examples(100, "train", seed=0, tasks=("copy",))
    _, history = run_trl_sft(model, tok, data, TRLSFTConfig(steps=12, batch_size=16, lr=3e-3, warmup=2, log_every=4))
    assert history["loss"][-1] < history["loss"][0] - 0.5, history


def test_lora_counts_merges_and_saves(tok, tmp_path):
    model = make_tiny_model(tok, seed=0)
    h, layers, r = model.config.hidden_size, model.config.num_hidden_layers, 4
    lora = add_lora(model, r=r, target_modules=("q_proj", "v_proj"))
    assert count_parameters(lora, trainable_only=True) == layers * 2 * r * (h + h)
    with torch.no_grad():  # make the adapters non-zero so merging matters
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = lora(input_ids=ids).logits
    path = merge_and_save(lora, tok, tmp_path / "merged")
    merged, _ = load_model(get_profile("gpu", model=str(path)), "sft")  # the GPU path's loader, on a local folder
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-4)


def test_gpu_profile_loads_a_local_model_through_the_same_calls(tok, tmp_path):
    path = save_model(make_tiny_model(tok, seed=1), tok, tmp_path / "m")
    model, tokenizer = load_model(get_profile("gpu", model=str(path)), "sft")
    assert model.config.model_type == "llama" and tokenizer.pad_token == "<pad>"


def test_coig_converter_on_the_real_schema():
    rows = read_jsonl("coig_cqia_sample.jsonl")
    assert {"instruction", "input", "output", "task_type", "domain", "metadata", "answer_from",
            "human_verified", "copyright"} <= set(rows[0])
    records = coig_to_sft(rows)
    assert records[0] == {"prompt": rows[0]["instruction"], "completion": rows[0]["output"]}
    assert records[1]["prompt"] == rows[1]["instruction"] + "\n\n" + rows[1]["input"]
    prompts, completions = to_sft_pairs(records)  # feeds the trainer
    assert completions[2] == rows[2]["output"]


def test_apt_instruction_format(tmp_path):
    records = load_apt_instructions(FIXTURES / "apt_instructions.json")
    assert records[0] == {"prompt": "add 3 5", "completion": "8"}
    assert records[1]["prompt"].endswith("She asked for the logs.")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_apt_instructions(empty)
    with pytest.raises(KeyError, match='"instructions"'):
        load_apt_instructions({"data": []})
    with pytest.raises(KeyError, match="row 1 has no column"):
        load_apt_instructions({"instructions": [{"instruction": "a", "output": "b"}, {"instruction": "c"}]})


@pytest.mark.parametrize("rows, error, match", [
    ([], ValueError, "zero rows"),
    ([{"instruction": "x", "input": "", "output": "  "}], ValueError, "row 0: column 'output' is empty"),
    ([{"instruction": "x", "output": "y"}, {"input": "", "output": "y"}], KeyError, "row 1 has no column"),
])
def test_bad_instruction_rows_are_clear_errors(rows, error, match):
    with pytest.raises(error, match=match):
        coig_to_sft(rows)


def test_bad_sft_examples_are_clear_errors():
    with pytest.raises(ValueError, match="zero rows"):
        to_sft_pairs([])
    with pytest.raises(KeyError, match="row 1 needs 'prompt'"):
        to_sft_pairs([{"prompt": "a", "answer": "b"}, {"answer": "c"}])
    with pytest.raises(ValueError, match="row 0 has an empty"):
        to_sft_pairs([{"prompt": " ", "answer": "b"}])
