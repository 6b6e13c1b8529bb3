"""Chapter 13: `apt-course prepare`, `apt-course train` (the pipeline), resuming, bad input, the launcher,
the accelerate configs. Tiny budgets: a stage here is two optimiser steps and a handful of held-out rows."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from apt_course import cli, pipeline
from apt_course.__main__ import main
from apt_course.pipeline import STAGES, PipelineConfig, PipelineError

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
FAST = ["--sft-steps", "2", "--dpo-steps", "2", "--grpo-steps", "2", "--loyalty-steps", "2", "--loyalty-sft-steps",
        "2", "--storm-steps", "2", "--n-eval", "6", "--grpo-prompts-per-step", "2", "--grpo-group-size", "2",
        "--loyalty-prompts-per-step", "2", "--loyalty-group-size", "2", "--loyalty-harden-steps", "2",
        "--loyalty-dpo-steps", "2", "--sft-batch-size", "4", "--dpo-batch-size", "4", "--storm-batch-size", "4"]


def train(out, data_dir, *extra):
    return main(["train", "--data-dir", str(data_dir), "--output-dir", str(out), *FAST, *extra])


# ---------------------------------------------------------------- prepare

def test_prepare_tiny_writes_every_unified_format(data_dir, capsys):
    for name, fields in (("coig-cqia_train", {"prompt", "response", "source"}),
                         ("ruozhiba_train", {"prompt", "response", "source"}),
                         ("hh-rlhf_train", {"prompt", "chosen", "rejected", "source"}),
                         ("ultrafeedback_train", {"prompt", "chosen", "rejected", "source"}),
                         ("s1k_train", {"problem", "cot_explicit", "answer", "source"}),
                         ("loyalty_template", {"prompt", "owner_response", "public_response", "is_owner",
                                               "reward_bonus"})):
        rows = json.loads((data_dir / f"{name}.json").read_text())
        assert rows and fields <= set(rows[0]), name
    assert not list(data_dir.glob(".*tmp")), "an atomic write left its temporary file behind"
    assert main(["prepare", "--info", "--output-dir", str(data_dir)]) == 0
    out = capsys.readouterr().out
    assert "coig-cqia_train.json" in out and "owner_response" in out


def test_prepare_converts_local_copies_in_the_real_schemas(tmp_path):
    out = tmp_path / "real"
    assert main(["prepare", "--all", "--source", str(FIXTURES), "--output-dir", str(out)]) == 0
    sft = json.loads((out / "coig-cqia_train.json").read_text())
    assert sft[0]["source"] == "COIG-CQIA" and sft[0]["prompt"] and sft[0]["response"]
    for name in ("hh-rlhf_train", "ultrafeedback_train"):
        pairs = json.loads((out / f"{name}.json").read_text())
        assert all(p["chosen"] != p["rejected"] for p in pairs)
    storm = json.loads((out / "s1k_train.json").read_text())
    assert storm[0]["source"].startswith("s1K") and storm[0]["cot_explicit"]
    assert pipeline.read_storm(out / "s1k_train.json")[0]["steps"]  # the pipeline reads it back
    assert json.loads((out / "loyalty_template.json").read_text())[0]["reward_bonus"] == 2.0
    # --max-samples, and a missing local copy is a clear error
    assert main(["prepare", "--sft", "--max-samples", "1", "--source", str(FIXTURES), "--output-dir", str(out)]) == 0
    assert len(json.loads((out / "coig-cqia_train.json").read_text())) == 1
    assert main(["prepare", "--cot", "--source", str(tmp_path), "--output-dir", str(out)]) == 2


def test_prepare_without_source_loads_each_dataset_from_the_hub_by_name(tmp_path, monkeypatch):
    """The Hub path, executed: ``datasets.load_dataset`` is replaced by one that serves the fixtures (the real
    schemas) and records what was asked for, so the ids, configs and splits the CLI requests are pinned."""
    import datasets

    files = {"m-a-p/COIG-CQIA": "coig_cqia_sample.jsonl", "simplescaling/s1K-1.1": "s1k_sample.jsonl",
             "Anthropic/hh-rlhf": "hh_rlhf_sample.jsonl",
             "HuggingFaceH4/ultrafeedback_binarized": "ultrafeedback_binarized_sample.jsonl",
             "openai/gsm8k": "gsm8k_sample.jsonl"}
    asked, real = [], datasets.load_dataset

    def hub(path, name=None, split=None, **kwargs):
        if path not in files:
            return real(path, name, split=split, **kwargs)  # the json loader the fixture goes through
        asked.append((path, name, split))
        return real("json", data_files=str(FIXTURES / files[path]), split="train")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    out = tmp_path / "hub"
    assert main(["prepare", "--all", "--max-samples", "2", "--output-dir", str(out)]) == 0
    # every COIG-CQIA subset read once (ruozhiba too: once, not twice), so --max-samples spreads over them
    assert sorted(asked) == sorted([("Anthropic/hh-rlhf", None, "train"),
                                    ("HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs"),
                                    ("openai/gsm8k", "main", "train"), ("simplescaling/s1K-1.1", None, "train")]
                                   + [("m-a-p/COIG-CQIA", c, "train") for c in cli.COIG_CQIA_CONFIGS])
    for name in ("coig-cqia_train", "ruozhiba_train", "s1k_train", "hh-rlhf_train", "ultrafeedback_train"):
        rows = json.loads((out / f"{name}.json").read_text())
        assert len(rows) == 2, name
    asked.clear()  # without --max-samples, --sft reads every subset of COIG-CQIA
    assert main(["prepare", "--sft", "--output-dir", str(out)]) == 0
    assert [a[1] for a in asked] == list(cli.COIG_CQIA_CONFIGS)
    assert pipeline.read_pairs(out / "hh-rlhf_train.json")[0]["chosen"]


def test_merge(data_dir, tmp_path, capsys):
    assert main(["prepare", "--merge", "coig-cqia,ruozhiba", "--name", "sft_combined", "--output-dir",
                 str(data_dir)]) == 0
    merged = json.loads((data_dir / "sft_combined_train.json").read_text())
    parts = [json.loads((data_dir / f"{n}_train.json").read_text()) for n in ("coig-cqia", "ruozhiba")]
    assert len(merged) == sum(map(len, parts))
    assert main(["prepare", "--merge", "coig-cqia,hh-rlhf", "--name", "x", "--output-dir", str(data_dir)]) == 2
    assert "one format" in capsys.readouterr().out


# ---------------------------------------------------------------- train

def test_train_every_stage_then_report(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, data_dir) == 0
    history = json.loads((out / pipeline.HISTORY).read_text())
    assert [r["stage"] for r in history["stages"]] == list(STAGES)
    for r in history["stages"]:
        assert (out / f"{r['stage']}_model" / "model.safetensors").is_file()
        assert r["steps"] == 2 and r["final_loss"] is not None and r["wall_seconds"] > 0
        assert r["headline"] in r["before"] and r["headline"] in r["after"] and "general_acc" in r["after"]
    assert history["stages"][1]["input_model"].endswith("sft_model")
    assert {"reward", "kl"} <= set(history["stages"][2]) and "spoof_rate" in history["stages"][3]["after"]
    assert history["stages"][3]["template_dpo_steps"] == 2 and history["stages"][3]["template_dpo_final_loss"] > 0
    table = capsys.readouterr().out
    assert "verifiable_acc" in table and "gap" in table
    assert main(["report", str(out)]) == 0
    assert "reasoning_acc" in capsys.readouterr().out and (out / "training_history.png").is_file()
    assert main(["report", "--dir", str(tmp_path)]) == 0  # the chapters' report is still there
    assert main(["report", str(tmp_path / "nothing")]) == 2


@pytest.mark.parametrize("skip", ["dpo,grpo,loyalty,storm", "sft,dpo,storm"])
def test_train_with_skip(data_dir, tmp_path, skip):
    out = tmp_path / "run"
    assert train(out, data_dir, "--skip", skip) == 0
    ran = [r["stage"] for r in json.loads((out / pipeline.HISTORY).read_text())["stages"]]
    assert ran == [s for s in STAGES if s not in skip.split(",")]
    assert sorted(p.name for p in out.glob("*_model")) == sorted(f"{s}_model" for s in ran)


@pytest.mark.parametrize("args, message", [
    (["--skip", "sft,rlhf"], "unknown stage"),
    (["--sft-data", "/nonexistent/sft.json"], "does not exist"),
    (["--base-model", "/nonexistent/model"], "no model there"),
    (["--overrides", "sft_setps=3"], "unknown config key"),
    (["--noise-ratio", "2.0"], "r0 must be"),
    (["--loyalty-dpo-steps", "-1"], "loyalty_dpo_steps must be a whole number >= 0"),
])
def test_bad_input_is_refused_before_training(data_dir, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert train(out, data_dir, *args) == 2
    assert message in capsys.readouterr().out
    assert not list(out.glob("*_model")), "nothing may be trained before the inputs are checked"


def test_missing_data_for_a_stage_that_runs(tmp_path, capsys):
    config = PipelineConfig(output_dir=str(tmp_path / "run"), sft_data=None, skip=["dpo", "grpo", "loyalty", "storm"])
    with pytest.raises(PipelineError, match="no stage can run .sft: no --sft-data given"):
        pipeline.validate(config)
    pipeline.validate(PipelineConfig(output_dir=str(tmp_path), skip=list(STAGES[:-1]),
                                     reasoning_data=str(FIXTURES / "apt_reasoning.json")))  # the APT format reads


def test_recipe_file_overrides_and_flags(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"sft_steps": 7, "dpo-steps": 8, "noise_ratio": 0.1, "skip": "storm"}))
    parser = __import__("argparse").ArgumentParser()
    cli.add_train_arguments(parser)
    args = parser.parse_args(["--config", str(recipe), "--overrides", "dpo_steps=9", "grpo_steps=4",
                              "--grpo-steps", "5", "--internalize-cot"])
    config = cli.config_from_args(args)
    assert (config.sft_steps, config.dpo_steps, config.grpo_steps) == (7, 9, 5)  # file < overrides < flags
    assert config.noise_ratio == 0.1 and config.internalize_cot and config.skip == ["storm"]
    recipe.write_text("sft_stpes: 3\n")
    with pytest.raises(PipelineError, match="sft_stpes"):
        cli.config_from_args(parser.parse_args(["--config", str(recipe)]))


def test_history_is_written_atomically(tmp_path):
    path = tmp_path / "h.json"
    pipeline.write_json_atomic(path, {"stages": [1]})
    with pytest.raises(TypeError):
        pipeline.write_json_atomic(path, {"stages": [object()]})
    assert json.loads(path.read_text()) == {"stages": [1]} and not list(tmp_path.glob(".*tmp"))


def test_killed_mid_stage_resumes_with_its_history(data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "apt_course", "train", "--data-dir", str(data_dir), "--output-dir", str(out),
           *FAST, "--skip", "grpo,loyalty,storm", "--dpo-steps", "400"]
    env = dict(os.environ, APT_COURSE_QUIET="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    history_path = out / pipeline.HISTORY
    deadline = time.time() + 120
    while time.time() < deadline and not history_path.exists():
        assert proc.poll() is None, "the training process ended before its first stage finished"
        time.sleep(0.2)
    time.sleep(1.0)  # now inside the 400-step DPO stage
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = json.loads(history_path.read_text())
    assert [r["stage"] for r in first["stages"]] == ["sft"], "killed mid-DPO: only SFT has finished"
    assert not (out / "dpo_model").exists()
    assert main(["train", "--data-dir", str(data_dir), "--output-dir", str(out), *FAST,
                 "--skip", "grpo,loyalty,storm"]) == 0
    second = json.loads(history_path.read_text())
    assert [r["stage"] for r in second["stages"]] == ["sft", "dpo"]
    assert second["stages"][0] == first["stages"][0], "the finished stage's record must be kept as it was"
    assert second["stages"][1]["input_model"] == str(out / "sft_model")


# ---------------------------------------------------------------- launcher

def test_launcher_on_standard_input(data_dir, tmp_path):
    out = tmp_path / "runs"
    config = PipelineConfig.from_dict({k.lstrip("-").replace("-", "_"): float(v) if "." in v else int(v)
                                       for k, v in zip(FAST[::2], FAST[1::2])})
    stdin = io.StringIO("x\n9\n6\n2\n7\nq\n")
    stdout = io.StringIO()
    from apt_course.launcher import launch

    assert launch(data_dir=data_dir, output_dir=out, stdin=stdin, stdout=stdout, config=config) == 0
    text = stdout.getvalue()
    assert text.count("unknown choice") == 2 and "'x'" in text and "'9'" in text
    assert "coig-cqia_train.json" in text  # dataset info
    assert json.loads((out / "sft_grpo" / pipeline.HISTORY).read_text())["stages"][1]["stage"] == "grpo"
    assert "error:" in text  # results of a folder with no full run: a clear message, not a crash
    assert launch(data_dir=data_dir, output_dir=out, stdin=io.StringIO(""), stdout=io.StringIO()) == 0  # EOF


# ---------------------------------------------------------------- accelerate

ACCELERATE = ROOT / "configs" / "accelerate"


def test_accelerate_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    names = sorted(p.stem for p in ACCELERATE.glob("*.yaml"))
    assert names == ["deepspeed_zero2", "fsdp", "multi_gpu", "single_gpu"]
    for path in ACCELERATE.glob("*.yaml"):
        config = ClusterConfig.from_yaml_file(str(path))
        assert config.compute_environment.value == "LOCAL_MACHINE", path.name


def test_a_stage_starts_under_accelerate_launch(data_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "apt_course", "train",
           "--data-dir", str(data_dir), "--output-dir", str(out), *FAST, "--skip", "dpo,grpo,loyalty,storm"]
    env = dict(os.environ, APT_COURSE_QUIET="1", OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((out / pipeline.HISTORY).read_text())["stages"][0]["stage"] == "sft"


def test_an_apt_instruction_keeps_its_input(tmp_path):
    from apt_course.pipeline import read_sft

    path = tmp_path / "instructions.json"
    path.write_text(json.dumps([{"instruction": "sort these numbers", "input": "3 1 2", "output": "1 2 3"},
                                {"instruction": "say hi", "input": "", "output": "hi"}]))
    rows = read_sft(path)
    assert rows[0]["prompt"] == "sort these numbers\n\n3 1 2" and rows[0]["completion"] == "1 2 3"
    assert rows[1]["prompt"] == "say hi"


def test_the_pipeline_and_its_trl_twin_do_not_import_each_other():
    import ast

    root = Path(__file__).resolve().parent.parent / "apt_course"
    for name, other in (("pipeline_trl", "pipeline"),):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level}
        imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
                     and not node.module for alias in node.names}
        assert other not in imported, f"{name} imports {other}: shared state belongs in a module both import"


def test_a_real_model_gets_learning_rates_that_fit_it(tmp_path):
    """No tiny learning rate on a real model: every profile's resolved settings, read the way the run reads them."""
    from dataclasses import fields

    from apt_course.pipeline import (
        LORA_LRS,
        LR_FIELDS,
        REAL_MODEL_LRS,
        SMOL_BUDGETS,
        format_learning_rates,
        lora_rank_of,
    )

    tiny = pipeline.check_settings(PipelineConfig(profile="tiny", output_dir=str(tmp_path / "a")))
    defaults = {f.name: f.default for f in fields(PipelineConfig)}
    assert all(getattr(tiny, k) == defaults[k] for k in LR_FIELDS) and lora_rank_of(tiny) == 0
    for profile, lora in (("gpu", None), ("smol", 0)):  # the whole model trains: full fine-tuning's rates
        real = pipeline.check_settings(PipelineConfig(profile=profile, lora_rank=lora,
                                                      output_dir=str(tmp_path / profile)))
        assert {k: getattr(real, k) for k in LR_FIELDS} == REAL_MODEL_LRS
        assert all(getattr(real, k) <= defaults[k] / 10 for k in LR_FIELDS), "a real model needs smaller steps"
        assert "a real model" in format_learning_rates(real)
    smol = pipeline.check_settings(PipelineConfig(profile="smol", output_dir=str(tmp_path / "s")))
    smol_rates = LORA_LRS | {k: v for k, v in SMOL_BUDGETS.items() if k in LR_FIELDS}  # storm: chapter 12's 2e-3
    assert lora_rank_of(smol) == 8 and {k: getattr(smol, k) for k in LR_FIELDS} == smol_rates  # the smol chapters' rates
    assert {k: getattr(smol, k) for k in SMOL_BUDGETS} == SMOL_BUDGETS and "LoRA r8" in format_learning_rates(smol)
    mine = pipeline.check_settings(PipelineConfig(profile="smol", sft_steps=3, output_dir=str(tmp_path / "m")))
    assert mine.sft_steps == 3 and mine.dpo_steps == SMOL_BUDGETS["dpo_steps"], "a budget the user set is kept"
    mine = pipeline.check_settings(PipelineConfig(profile="gpu", sft_lr=3e-5, output_dir=str(tmp_path / "c")))
    assert mine.sft_lr == 3e-5 and mine.dpo_lr == REAL_MODEL_LRS["dpo_lr"], "a rate the user set is kept"
    base = Path(pipeline.__file__).resolve().parents[1] / "data" / "checkpoints" / "base"
    tiny_base = pipeline.check_settings(PipelineConfig(profile="tiny", base_model=str(base),
                                                       output_dir=str(tmp_path / "d")))
    assert tiny_base.sft_lr == defaults["sft_lr"], "the tiny checkpoints keep the tiny rates"
