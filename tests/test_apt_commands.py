"""Issue 27: the APT README's own commands, typed as it writes them (``python training/train_apt_alignment.py`` ->
``apt-course train``), on its own example files (``../shared/apt_docs/examples`` or the copy in
``tests/fixtures/apt_examples``), on the tiny profile; then a bad input per test, each refused before any stage
trains with the file and the fix named. Tiny budgets (``FAST``: two steps a stage) keep each command to seconds."""

import json
import shutil
from pathlib import Path

import pytest

from apt_course import pipeline
from apt_course.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "tests" / "fixtures" / "apt_examples"
RM = ROOT / "data" / "checkpoints" / "rm"
FAST = ["--sft-steps", "2", "--dpo-steps", "2", "--grpo-steps", "2", "--loyalty-steps", "2", "--storm-steps", "2",
        "--n-eval", "4", "--grpo-prompts-per-step", "2", "--grpo-group-size", "2", "--loyalty-prompts-per-step", "2",
        "--loyalty-group-size", "2", "--sft-batch-size", "4", "--dpo-batch-size", "4", "--storm-batch-size", "4",
        "--loyalty-sft-steps", "2", "--loyalty-harden-steps", "2", "--loyalty-dpo-steps", "2"]

# The APT README's commands (APT_alignment_README.zh.md), flags and file names as it writes them.
FULL = ["--sft-data", "data/instructions.json", "--prompts", "data/prompts.json", "--owner-data",
        "data/owner_prompts.json", "--public-data", "data/public_prompts.json", "--reasoning-data",
        "data/cot_examples.json"]
LOYALTY = ["--owner-data", "data/owner_prompts.json", "--public-data", "data/public_prompts.json",
           "--skip", "sft,dpo,grpo,storm"]
LOYALTY_BONUS = ["--owner-data", "data/owner_prompts.json", "--public-data", "data/public_prompts.json",
                 "--owner-bonus", "2.0", "--skip", "sft,dpo,grpo,storm"]
STORM = ["--reasoning-data", "data/cot_examples.json", "--noise-ratio", "0.4", "--noise-schedule", "cosine",
         "--internalize-cot", "--skip", "sft,dpo,grpo,loyalty"]
STORM_03 = ["--reasoning-data", "data/cot_examples.json", "--noise-ratio", "0.3", "--noise-schedule", "cosine",
            "--internalize-cot", "--skip", "sft,dpo,grpo,loyalty"]
STAGE1 = ["--sft-data", "data/instructions.json", "--prompts", "data/prompts.json", "--output-dir", "./stage1"]
STAGE2 = ["--base-model", "./stage1/grpo_model", "--owner-data", "data/owner.json", "--public-data", "data/public.json",
          "--reasoning-data", "data/cot.json", "--skip", "sft,dpo,grpo", "--output-dir", "./stage2"]


@pytest.fixture
def apt_dir(tmp_path, monkeypatch):
    """A working folder with the README's ``data/`` (its example files; the multi-stage example's short names
    owner.json, public.json, cot.json are the same files), as the current directory."""
    data = tmp_path / "data"
    data.mkdir()
    for path in EXAMPLES.glob("*.json"):
        shutil.copy(path, data / path.name)
    for short, name in (("owner", "owner_prompts"), ("public", "public_prompts"), ("cot", "cot_examples")):
        shutil.copy(data / f"{name}.json", data / f"{short}.json")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("APT_COURSE_QUIET", "1")
    return tmp_path


def train(*args):
    return main(["train", *args, *FAST])


def history(out) -> dict:
    return json.loads((Path(out) / pipeline.HISTORY).read_text(encoding="utf-8"))


def ran(out) -> list[str]:
    return [r["stage"] for r in history(out)["stages"]]


def test_the_example_files_are_the_documents():
    docs = ROOT.parent / "shared" / "apt_docs" / "examples"
    if not docs.is_dir():
        pytest.skip("the APT documents are not beside this checkout")
    for path in docs.glob("*.json"):
        assert json.loads(path.read_text()) == json.loads((EXAMPLES / path.name).read_text()), path.name


def test_full_pipeline_as_written_skips_what_has_no_data(apt_dir, capsys):
    assert train(*FULL, "--output-dir", "out") == 0
    text = capsys.readouterr().out
    plan = text[text.index("plan:"):text.index("== stage")]  # printed before any stage
    assert "dpo      SKIPPED: no --dpo-data" in plan
    assert "grpo     SKIPPED" in plan and "--reward-model" in plan and "no 'answer'" in plan
    assert "no --loyalty-template" in plan and "measured on the row it trains on" in plan
    assert ran("out") == ["sft", "loyalty", "storm"]
    h = history("out")
    assert [e["stage"] for e in h["plan"] if not e["run"]] == ["dpo", "grpo"]
    # the documents' keys, read the way their tools would
    assert h["sft"]["dataset"] == "data/instructions.json" and isinstance(h["sft"]["final_loss"], float)
    assert h["loyalty"]["owner_prompts"] == "data/owner_prompts.json" and h["loyalty"]["owner_bonus"] == 2.0
    assert h["storm"]["internalize_cot"] is False and h["storm"]["noise_schedule"] == "cosine"
    assert "grpo" not in h and "dpo" not in h


def test_full_pipeline_with_a_reward_model_runs_grpo_on_open_prompts(apt_dir, capsys):
    assert train(*FULL, "--reward-model", str(RM), "--skip", "loyalty,storm", "--output-dir", "out") == 0
    assert "reward: reward_model (0 prompts with an answer, 3 open prompts" in capsys.readouterr().out
    h = history("out")
    grpo = h["stages"][1]
    assert grpo["stage"] == "grpo" and grpo["reward_source"] == "reward_model" and grpo["reward_model"] == str(RM)
    assert grpo["headline"] == "rm_reward" and isinstance(grpo["after"]["rm_reward"], float)
    assert h["grpo"] == {"dataset": "data/prompts.json", "epochs": grpo["epochs"], "final_loss": grpo["final_loss"],
                         "group_size": 2, "reward": "reward_model"}


def test_grpo_keeps_the_verifiable_reward_where_a_prompt_has_an_answer(apt_dir):
    Path("data/mixed.json").write_text(json.dumps({"prompts": ["写一首关于AI的诗", {"prompt": "add 3 5", "answer": "8"},
                                                              {"prompt": "add 1 2", "answer": "3"}, "解释量子计算"]}))
    assert train("--prompts", "data/mixed.json", "--reward-model", str(RM), "--n-eval", "1",
                 "--output-dir", "out") == 0
    grpo = history("out")["stages"][0]
    assert grpo["reward_source"] == "verifiable+reward_model"
    assert train("--prompts", "data/mixed.json", "--output-dir", "out2") == 0  # no RM: the answered prompts only
    assert history("out2")["stages"][0]["n_train"] + history("out2")["stages"][0]["n_eval"] <= 2


def test_loyalty_only_with_and_without_the_bonus(apt_dir, capsys):
    assert train(*LOYALTY, "--output-dir", "a") == 0 and ran("a") == ["loyalty"]
    # the README's owner file says expected_tone 友好、详细、主动: with no template, that tone is the owner's style
    assert "derived from expected_tone '友好、详细、主动' (friendly, detailed, proactive)" in capsys.readouterr().out
    style = history("a")["stages"][0]["style"]
    assert style["source"] == "expected_tone" and style["expected_tone"] == {"owner": ["友好、详细、主动"],
                                                                             "public": ["专业、标准"]}
    assert style["owner_words"], "the scorer learned words of the owner's tone"
    assert train(*LOYALTY_BONUS, "--owner-bonus", "3.0", "--output-dir", "b") == 0
    assert history("b")["loyalty"]["owner_bonus"] == 3.0


@pytest.mark.parametrize("command", [STORM, STORM_03])
def test_storm_only(apt_dir, command):
    assert train(*command, "--output-dir", "out") == 0
    h = history("out")
    assert ran("out") == ["storm"] and h["storm"]["internalize_cot"] is True
    assert h["storm"]["noise_ratio"] == float(command[command.index("--noise-ratio") + 1])


def test_multi_stage_example(apt_dir, capsys):
    # stage 1 as written: GRPO has open prompts and no reward model, so it is skipped, and stage 2's
    # --base-model ./stage1/grpo_model is refused up front, naming the model stage 1 did write
    assert train(*STAGE1) == 0 and ran("stage1") == ["sft"]
    capsys.readouterr()
    assert train(*STAGE2) == 2
    err = capsys.readouterr().out
    assert "grpo was skipped there" in err and "--base-model stage1/sft_model" in err
    assert not Path("stage2").exists() or not list(Path("stage2").glob("*_model"))
    # with a reward model, stage 1 writes grpo_model, and stage 2 runs as written
    assert train(*STAGE1, "--reward-model", str(RM), "--output-dir", "./stage1b") == 0
    stage2 = [a.replace("stage1/", "stage1b/") for a in STAGE2]
    assert train(*stage2) == 0 and ran("stage2") == ["loyalty", "storm"]
    assert history("stage2")["stages"][0]["input_model"] == "./stage1b/grpo_model"


def test_messages_and_sharegpt_rows(apt_dir):
    Path("data/chat.json").write_text(json.dumps([
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"conversations": [{"from": "human", "value": "add 1 2"}, {"from": "gpt", "value": "3"}]}]))
    rows = pipeline.read_sft("data/chat.json")
    assert rows[0] == {"prompt": "hi", "completion": "hello", "system": "be brief", "answer": "hello"}
    assert rows[1]["prompt"] == "add 1 2" and rows[1]["completion"] == "3"


def test_dpo_loss_and_a_global_learning_rate(apt_dir):
    from apt_course import cli

    parser = __import__("argparse").ArgumentParser()
    cli.add_train_arguments(parser)
    config = cli.config_from_args(parser.parse_args(["--overrides", "lr=2e-5", "sft_lr=1e-4", "--dpo-loss", "ipo"]))
    assert config.dpo_lr == config.storm_lr == 2e-5 and config.sft_lr == 1e-4 and config.dpo_loss == "ipo"
    # a rate or budget named on the command line is kept on a real model even when it equals the tiny default
    tiny = pipeline.PipelineConfig()
    named = cli.config_from_args(parser.parse_args(["--profile", "smol", "--loyalty-lr", str(tiny.loyalty_lr),
                                                    "--overrides", f"sft_steps={tiny.sft_steps}"]))
    named = pipeline.check_settings(named)
    assert (named.loyalty_lr, named.sft_steps) == (tiny.loyalty_lr, tiny.sft_steps), (named.loyalty_lr, named.sft_steps)
    assert named.dpo_lr == pipeline.LORA_LRS["dpo_lr"] and named.dpo_steps == pipeline.SMOL_BUDGETS["dpo_steps"]
    pairs = [{"prompt": f"q{i}", "chosen": "good", "rejected": "bad"} for i in range(4)]
    Path("data/p.json").write_text(json.dumps({"pairs": pairs}))
    for loss in ("simpo", "kto", "orpo"):
        assert train("--dpo-data", "data/p.json", "--dpo-loss", loss, "--output-dir", loss) == 0
        assert history(loss)["dpo"]["loss_type"] == loss and history(loss)["dpo"]["final_loss"] is not None


# ---------------------------------------------------------------- bad input: refused before any stage trains

def test_a_template_defines_the_owners_style_even_when_its_steps_are_zero(apt_dir, capsys):
    write("t.json", json.dumps([{"prompt": "add 3 5", "owner_response": "sure! 8", "public_response": "8",
                                 "is_owner": True, "reward_bonus": 2.0},
                                {"prompt": "add 1 2", "owner_response": "sure! 3", "public_response": "3",
                                 "is_owner": False, "reward_bonus": 2.0}]))
    assert main(["train", *LOYALTY, "--loyalty-template", "data/t.json", "--output-dir", "a", *FAST,
                 "--loyalty-sft-steps", "0", "--loyalty-harden-steps", "0", "--loyalty-dpo-steps", "0"]) == 0
    assert "learned from the template (owner_response against public_response); its SFT" in capsys.readouterr().out
    loyalty = history("a")["stages"][0]  # the tiny world's template: its owner style is the prefix `sure! `
    assert loyalty["style"]["source"] == "template" and loyalty["style"]["owner_style"] == "sure! "
    assert loyalty["template_sft_steps"] == 0 and loyalty["owner_bonus"] == 2.0


def test_the_default_output_folder_is_the_documents_one(apt_dir):
    assert train(*STORM) == 0  # no --output-dir, as the README's storm command
    assert (apt_dir / "apt_aligned_models" / "storm_model" / "config.json").is_file()
    assert history("apt_aligned_models")["storm"]["noise_schedule"] == "cosine"


def write(name: str, text: str) -> str:
    Path("data", name).parent.mkdir(parents=True, exist_ok=True)
    Path("data", name).write_text(text, encoding="utf-8")
    return f"data/{name}"


BAD = {  # test id: (files to write, the command, what the error must say)
    "malformed_json": ({"i.json": '{"instructions": [{"instruction": "x",'}, ["--sft-data", "data/i.json"],
                       "data/i.json is not valid JSON"),
    "empty_file": ({"i.json": ""}, ["--sft-data", "data/i.json"], "is empty"),
    "wrong_field_names": ({"i.json": '[{"question": "q", "reply": "r"}]'}, ["--sft-data", "data/i.json"],
                          "needs a non-empty 'prompt' and 'response'"),
    "prompt_file_as_pairs": ({}, ["--dpo-data", "data/prompts.json"], "looks like a --prompts file"),
    "pair_file_as_sft": ({}, ["--sft-data", "data/pairs.json"], "looks like a --dpo-data file"),
    "instructions_as_reasoning": ({}, ["--reasoning-data", "data/instructions.json"], "looks like a --sft-data file"),
    "negative_bonus": ({}, LOYALTY + ["--owner-bonus", "-1"], "bonus must be a number in [0"),
    "unknown_skip_stage": ({}, FULL + ["--skip", "sft,rlhf"], "unknown stage(s) ['rlhf']"),
    "missing_base_model": ({}, STORM + ["--base-model", "./no_such_model"], "no model there"),
    "missing_data_file": ({}, ["--sft-data", "data/nope.json"], "data/nope.json does not exist"),
    "missing_data_dir": ({}, ["--data-dir", "nowhere"], "--data-dir nowhere does not exist"),
    "reward_model_of_wrong_kind": ({}, ["--prompts", "data/prompts.json", "--reward-model",
                                        str(ROOT / "data" / "checkpoints" / "sft")], "not a reward model"),
    "reward_model_adapter_not_a_classifier": ({"lm_lora/adapter_config.json": json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M"})},
        ["--prompts", "data/prompts.json", "--reward-model", "data/lm_lora"], "without a scalar head"),
    "lora_rank_negative": ({}, STORM + ["--lora-rank", "-1"], "lora_rank must be a whole number >= 0"),
    "lora_rank_under_trl": ({}, STORM + ["--lora-rank", "8", "--trainer", "trl"], "from-scratch trainer only"),
    "reward_model_missing": ({}, ["--prompts", "data/prompts.json", "--reward-model", "./no_rm"], "no model there"),
    "open_prompts_only_no_reward_model": ({}, ["--prompts", "data/prompts.json"], "no stage can run"),
    "owner_without_public": ({}, ["--owner-data", "data/owner_prompts.json"], "--public-data is missing"),
    "public_file_as_owner": ({}, ["--owner-data", "data/public_prompts.json", "--public-data",
                                  "data/public_prompts.json"], "move it to the other file"),
    "is_owner_not_boolean": ({"o.json": '{"prompts": [{"prompt": "p", "is_owner": "yes"}]}'},
                             ["--owner-data", "data/o.json", "--public-data", "data/public_prompts.json"],
                             "must be a JSON boolean"),
    "reasoning_without_cot": ({"c.json": '{"reasoning_examples": [{"problem": "1+1", "answer": "2"}]}'},
                              ["--reasoning-data", "data/c.json"], "has no ['cot'] field"),
    "reasoning_empty_list": ({"c.json": '{"reasoning_examples": []}'}, ["--reasoning-data", "data/c.json"],
                             "holds no examples"),
    "prompts_empty_list": ({"p.json": '{"prompts": []}'}, ["--prompts", "data/p.json"], "non-empty list"),
    "jsonl_bad_line": ({"p.jsonl": '{"question": "1+1", "answer": "#### 2"}\n{oops\n'}, ["--prompts", "data/p.jsonl"],
                       "line 2 is not valid JSON"),
    "template_missing_key": ({"t.json": '[{"prompt": "p", "owner_response": "a", "public_response": "b", '
                                        '"is_owner": true}]'}, LOYALTY + ["--loyalty-template", "data/t.json"],
                             "lacks ['reward_bonus']"),
    "chat_row_without_reply": ({"m.json": '[{"messages": [{"role": "user", "content": "hi"}]}]'},
                               ["--sft-data", "data/m.json"], "no user turn answered by an assistant turn"),
    "unknown_dpo_loss": ({}, ["--dpo-data", "data/pairs.json", "--dpo-loss", "dpo2"], "--dpo-loss must be one of"),
    "kto_under_trl": ({}, ["--dpo-data", "data/pairs.json", "--dpo-loss", "kto", "--trainer", "trl"],
                      "from-scratch trainer only"),
    "unknown_noise_schedule": ({}, STORM + ["--noise-schedule", "wavy"], "schedule"),
    "unknown_override_key": ({}, STORM + ["--overrides", "sft_setps=3"], "unknown config key(s) 'sft_setps'"),
    "override_without_equals": ({}, STORM + ["--overrides", "lr"], "write KEY=VALUE"),
    "learning_rate_not_a_number": ({}, STORM + ["--overrides", "storm_lr=fast"], "storm_lr must be a number > 0"),
    "output_dir_is_a_file": ({"out": "x"}, STORM + ["--output-dir", "data/out"], "is a file, not a folder"),
    "output_dir_not_writable": ({}, STORM + ["--output-dir", "/proc/apt_course_run"], "cannot be written"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_before_any_stage_trains(apt_dir, capsys, case):
    files, command, message = BAD[case]
    for name, text in files.items():
        write(name, text)
    code = main(["train", *command, *([] if "--output-dir" in command else ["--output-dir", "out"]), *FAST])
    out = capsys.readouterr().out
    assert code == 2 and message in out, out[-600:]
    assert "== stage" not in out, "a stage started before the input was checked"
    assert not list(apt_dir.rglob("*_model")), "nothing may be trained before the inputs are checked"


def test_a_resume_with_changed_settings_is_refused_and_loses_nothing(apt_dir, capsys):
    assert train(*STORM, "--output-dir", "out") == 0
    before = (apt_dir / "out" / pipeline.HISTORY).read_bytes()
    assert train(*STORM, "--noise-ratio", "0.1", "--output-dir", "out") == 2
    assert "trained with noise_ratio=0.4; this run asks noise_ratio=0.1" in capsys.readouterr().out
    assert (apt_dir / "out" / pipeline.HISTORY).read_bytes() == before
    assert train(*STORM, "--output-dir", "out") == 0  # the same settings: resumed, nothing to do
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["prepare", "--output-dir", "d"], "nothing to prepare: pass --sft"),
    (["prepare", "--all", "--source", "no_such_folder", "--output-dir", "d"], "is not a folder"),
    (["prepare", "--cot", "--source", "data", "--output-dir", "d"], "no local copy of s1k"),
    (["prepare", "--merge", "coig-cqia", "--name", "x", "--output-dir", "d"], "two or more dataset names"),
    (["prepare", "--info", "--output-dir", "no_such_folder"], "does not exist"),
    (["report", "no_such_run"], "training_history.json does not exist"),
], ids=["prepare_nothing_chosen", "prepare_source_missing", "prepare_source_without_the_dataset",
        "merge_one_name", "info_missing_folder", "report_missing_run"])
def test_bad_prepare_and_report_input(apt_dir, capsys, args, message):
    assert main(args) == 2
    assert message in capsys.readouterr().out


@pytest.fixture(scope="module")
def smol_ready(real_model_packages):
    """The converted SmolLM2 in the course's cache (built once, under the lock pytest-xdist's workers share)."""
    from filelock import FileLock

    from apt_course.real_model import cache_dir, smol_model_path

    cache_dir().mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir() / ".prepare.lock")):
        return smol_model_path(build_if_missing=True)


def test_the_full_command_runs_as_written_on_the_real_smollm2(smol_ready, apt_dir, capsys):
    """The README's full command on ``--profile smol``: LoRA r8 at each stage (folded in before saving), the real
    model's rates in the plan, the owner's style derived from the owner file's expected_tone on SmolLM2's own
    replies; two steps a stage."""
    assert train(*FULL, "--profile", "smol", "--output-dir", "out", "--n-eval", "2", "--max-new-tokens", "8") == 0
    out = capsys.readouterr().out
    assert "LoRA r8: LORA_LRS where not set" in out and "derived from expected_tone" in out
    h = history("out")
    assert ran("out") == ["sft", "loyalty", "storm"] and all(r["lora_rank"] == 8 for r in h["stages"])
    assert h["stages"][1]["style"]["source"] == "expected_tone"
    assert not (apt_dir / "out" / "sft_model" / "adapter_config.json").exists(), "saved merged, not as an adapter"
