"""Chapter 13: `apt-course train --trainer trl` — the stages through TRL's trainers, in one process and data parallel
under `accelerate launch` (two CPU processes over gloo). Tiny budgets: two optimiser steps a stage."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from test_pipeline import FAST  # the same tiny budgets

from apt_course import pipeline, pipeline_trl
from apt_course.__main__ import main
from apt_course.pipeline import STAGES, PipelineConfig, PipelineError
from apt_course.storm import StormConfig, noisy_completion_loss
from apt_course.training import trl_loss_on_batch

DISTRIBUTED = torch.distributed.is_available() and torch.distributed.is_gloo_available()


def launch(data_dir, out, *extra, processes=2):
    """``apt-course train`` under ``accelerate launch`` with ``processes`` CPU processes. ``--cpu`` would start one
    process only (accelerate's simple launcher); ``--multi_gpu`` starts them through torchrun, and
    ``ACCELERATE_USE_CPU`` keeps them on the CPU, talking over gloo."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           "-m", "apt_course", "train", "--data-dir", str(data_dir), "--output-dir", str(out), *FAST, *extra]
    env = dict(os.environ, APT_COURSE_QUIET="1", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true",
               APT_COURSE_DEVICE="cpu")
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_every_stage_trains_through_trl(data_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(data_dir), "--output-dir", str(out), *FAST, "--trainer", "trl"]) == 0
    history = json.loads((out / pipeline.HISTORY).read_text())
    assert [r["stage"] for r in history["stages"]] == list(STAGES)
    for r in history["stages"]:
        assert (out / f"{r['stage']}_model" / "model.safetensors").is_file()
        assert r["trainer"] == "trl" and r["num_processes"] == 1 and r["steps"] == 2
        assert len(r["curve"]["step"]) == 2 and math.isfinite(r["final_loss"])
    grpo, loyalty, storm = history["stages"][2:]
    assert math.isfinite(grpo["reward"]) and math.isfinite(loyalty["kl"])  # loyalty's beta > 0: TRL logs the KL
    assert math.isfinite(loyalty["template_sft_final_loss"]) and math.isfinite(loyalty["harden_final_loss"])
    assert loyalty["template_dpo_steps"] == 2 and math.isfinite(loyalty["template_dpo_final_loss"])
    assert storm["curve"]["ratio"][0] == pytest.approx(0.3) and "clean_loss" in storm["curve"]
    assert not (out / ".trl").exists(), "the TRL trainers' scratch folders (and GRPO's reference) are removed"


def test_storm_trainer_loss_is_the_noisy_completion_loss(data_dir, tok, tmp_path):
    from apt_course.model import make_tiny_model

    model = make_tiny_model(tok, seed=0)
    records = pipeline.read_storm(data_dir / "s1k_train.json")[:8]
    losses = {}
    for r0 in (0.0, 0.5):
        trainer = pipeline_trl.make_storm_trainer(model, tok, records, StormConfig(
            steps=2, batch_size=4, r0=r0, schedule="cosine", cot="explicit", seed=3), output_dir=tmp_path)
        loss, batch = trl_loss_on_batch(trainer, 4)
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        expected = noisy_completion_loss(logits, batch["labels"], r0, torch.Generator().manual_seed(3))
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
        losses[r0] = loss.item()
    assert losses[0.0] != pytest.approx(losses[0.5], rel=1e-4), "the noise at r0 = 0.5 changes the loss"


@pytest.mark.skipif(not DISTRIBUTED, reason="torch.distributed with the gloo backend is unavailable")
def test_two_processes_train_once_data_parallel(data_dir, tmp_path):
    out = tmp_path / "run"
    done = launch(data_dir, out, "--trainer", "trl", "--skip", "grpo,loyalty,storm")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    history = json.loads((out / pipeline.HISTORY).read_text())
    assert [r["stage"] for r in history["stages"]] == ["sft", "dpo"], "one history, each stage recorded once"
    for r in history["stages"]:
        assert r["num_processes"] == 2 and r["steps"] == 2 and math.isfinite(r["final_loss"])
        assert (out / f"{r['stage']}_model" / "model.safetensors").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["dpo_model", "sft_model", pipeline.HISTORY]
    assert done.stdout.count(f"history: {out / pipeline.HISTORY}") == 1, "the final table is printed once, not per process"


@pytest.mark.skipif(not DISTRIBUTED, reason="torch.distributed with the gloo backend is unavailable")
def test_scratch_trainers_refuse_several_processes(data_dir, tmp_path):
    out = tmp_path / "run"
    done = launch(data_dir, out, "--skip", "dpo,grpo,loyalty,storm")
    assert done.returncode != 0
    assert "the from-scratch trainers are single-process: use --trainer trl" in done.stdout
    assert not out.exists() or not list(out.glob("*_model")), "nothing may be trained"


def test_unknown_trainer_is_refused(tmp_path, capsys):
    with pytest.raises(PipelineError, match="'scratch'.*'trl'"):
        pipeline.validate(PipelineConfig(output_dir=str(tmp_path), trainer="bogus"))
    assert main(["train", "--output-dir", str(tmp_path), "--trainer", "bogus"]) == 2
    assert "--trainer 'bogus' is unknown" in capsys.readouterr().out


def test_grpo_with_a_reward_model_through_trl(tmp_path):
    """Open prompts scored by ``--reward-model`` (chapter 05's tiny RM) through ``trl.GRPOTrainer``."""
    from pathlib import Path

    root = Path(__file__).resolve().parent
    out = tmp_path / "run"
    assert main(["train", "--prompts", str(root / "fixtures" / "apt_examples" / "prompts.json"), "--reward-model",
                 str(root.parent / "data" / "checkpoints" / "rm"), "--output-dir", str(out), *FAST,
                 "--trainer", "trl"]) == 0
    grpo = json.loads((out / pipeline.HISTORY).read_text())["stages"][0]
    assert grpo["reward_source"] == "reward_model" and math.isfinite(grpo["after"]["rm_reward"])
    assert math.isfinite(grpo["reward"])
