"""Issue 27, item 10: the launcher, driven through its stdin/stdout parameters: the dataset guide's prepare submenu
(COIG-CQIA, s1K, hh-rlhf, ruozhiba, the loyalty template, all; the tiny world), the profile and base-model
settings, and bad answers (each said, the menu goes on)."""

import io
import json
from pathlib import Path

from apt_course import pipeline
from apt_course.launcher import PREPARE_MENU, launch
from apt_course.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "tests" / "fixtures" / "apt_sources"
FAST = {"sft_steps": 2, "dpo_steps": 2, "grpo_steps": 2, "loyalty_steps": 2, "storm_steps": 2, "n_eval": 4,
        "grpo_prompts_per_step": 2, "grpo_group_size": 2, "loyalty_prompts_per_step": 2, "loyalty_group_size": 2,
        "sft_batch_size": 4, "dpo_batch_size": 4, "storm_batch_size": 4, "loyalty_sft_steps": 2,
        "loyalty_harden_steps": 2, "loyalty_dpo_steps": 2}


def run(answers: list[str], **kwargs) -> tuple[int, str]:
    stdout = io.StringIO()
    code = launch(stdin=io.StringIO("".join(a + "\n" for a in answers)), stdout=stdout, **kwargs)
    return code, stdout.getvalue()


def test_prepare_submenu_is_the_guides(tmp_path):
    labels = [label for label, _ in PREPARE_MENU.values()]
    for word in ("COIG-CQIA", "s1K", "HH-RLHF", "ruozhiba", "loyalty template", "all"):
        assert any(word in label for label in labels), word
    data = tmp_path / "data"
    # 1 -> 1 (SFT only) from local copies, 50 rows; 1 -> 2 (CoT only); 1 -> 4 (ruozhiba); then dataset info
    code, text = run(["1", "1", str(SOURCES), "50", "1", "2", str(SOURCES), "", "1", "4", str(SOURCES), "", "6", "q"],
                     data_dir=data, output_dir=tmp_path / "runs")
    assert code == 0 and "error" not in text, text[-800:]
    assert sorted(p.name for p in data.glob("*.json")) == ["coig-cqia_train.json", "ruozhiba_train.json",
                                                           "s1k_train.json"]
    sft = json.loads((data / "coig-cqia_train.json").read_text())
    assert not any(r["source"] == "COIG-CQIA/ruozhiba" for r in sft)  # moved out when ruozhiba was prepared
    assert "s1k_train.json" in text.split("choice: ")[-2]  # the info table


def test_prepare_all_then_train_everything_from_the_menu(tmp_path):
    data, runs = tmp_path / "data", tmp_path / "runs"
    code, text = run(["1", "6", str(SOURCES), "", "5", "q"], data_dir=data, output_dir=runs,
                     config=PipelineConfig.from_dict(FAST))
    assert code == 0 and "error" not in text, text[-800:]
    for name in ("prompts_train.json", "owner_prompts.json", "public_prompts.json", "loyalty_template.json",
                 "hh-rlhf_train.json", "ultrafeedback_train.json"):
        assert (data / name).is_file(), name
    history = json.loads((runs / pipeline.HISTORY).read_text())
    assert [r["stage"] for r in history["stages"]] == ["sft", "dpo", "grpo", "loyalty", "storm"]


def test_profile_and_base_model_settings(tmp_path, data_dir):
    base = ROOT / "data" / "checkpoints" / "base"
    answers = ["8", "gpu2", "8", "tiny", "./no_such_model", "8", "", str(base), "4", "q"]
    code, text = run(answers, data_dir=data_dir, output_dir=tmp_path / "runs", config=PipelineConfig.from_dict(FAST))
    assert code == 0
    assert "unknown profile 'gpu2': type one of tiny, smol, gpu" in text
    assert "--base-model ./no_such_model: no model there" in text
    assert f"profile tiny, base model {base}" in text
    storm = json.loads((tmp_path / "runs" / "sft_storm" / pipeline.HISTORY).read_text())
    assert storm["stages"][0]["input_model"] == str(base) and storm["config"]["profile"] == "tiny"
    # given up front (apt-course launch --profile --base-model), shown in the menu's title
    code, text = run(["q"], data_dir=data_dir, profile="smol", base_model=str(base))
    assert "APT launcher (profile smol" in text


def test_bad_answers_are_said_and_the_menu_goes_on(tmp_path):
    data = tmp_path / "data"
    answers = ["1", "z", "b",  # a wrong submenu choice, then back
               "1", "1", str(SOURCES), "many",  # rows per dataset not a number
               "1", "3", str(tmp_path / "nowhere"), "",  # a source folder that does not exist
               "q"]
    code, text = run(answers, data_dir=data)
    assert code == 0
    assert "unknown choice 'z': type one of 1, 2, 3, 4, 5, 6, 7, 8, b" in text
    assert "'many' is not a whole number" in text
    assert "--source" in text and "is not a folder" in text
    assert not data.exists() or not list(data.glob("*.json"))
    for cut in (["1"], ["1", "1"], ["1", "1", str(SOURCES)], ["8"], ["8", "tiny"]):  # end of input anywhere: quits
        assert run(cut, data_dir=data)[0] == 0


def test_prepare_submenu_writes_the_smol_world(tmp_path):
    code, text = run(["1", "8", "q"], data_dir=tmp_path / "data", output_dir=tmp_path / "runs")
    assert code == 0 and "error" not in text, text[-800:]
    first = json.loads((tmp_path / "data" / "coig-cqia_train.json").read_text())[0]
    assert first["prompt"].startswith("What is ") and first["source"] == "smol-world/english-sums"
