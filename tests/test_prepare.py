"""Issue 27, items 4 and 6: ``apt-course prepare`` feeds ``apt-course train``. From local copies in the real schemas
(``tests/fixtures/apt_sources``: COIG-CQIA laid out as its Hub repository, s1K-1.1, hh-rlhf, GSM8K, UltraFeedback)
it writes every file the pipeline reads; the pipeline then trains all five stages on them (tiny profile, two steps
a stage). Then the converters' details (subsets, ruozhiba once, s1K's final answer) and bad input, each a clear
error naming the file or flag and the fix, with nothing written."""

import json
import shutil
from pathlib import Path

import pytest
from test_apt_commands import FAST  # the same tiny budgets

from apt_course import cli, pipeline
from apt_course.__main__ import main
from apt_course.data import answer_match, final_answer

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ROOT / "tests" / "fixtures" / "apt_sources"
RM = ROOT / "data" / "checkpoints" / "rm"


def rows(path) -> list:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    return data["prompts"] if isinstance(data, dict) else data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    assert main(["prepare", "--all", "--source", str(SOURCES), "--output-dir", str(out)]) == 0
    return out


def test_prepare_all_from_source_writes_every_file_the_pipeline_reads(prepared):
    for names in pipeline.DATA_FILES.values():
        for name in names.split(","):
            assert (prepared / name).is_file(), name
    # SFT: per-subset source and task_type kept; the ruozhiba subset in ruozhiba_train.json only
    sft = rows(prepared / "coig-cqia_train.json")
    assert {r["source"] for r in sft} == {"COIG-CQIA/exam", "COIG-CQIA/wiki", "COIG-CQIA/zhihu"}
    assert all(r["task_type"]["major"] for r in sft)
    assert any("\n\n" in r["prompt"] for r in sft if r["source"] == "COIG-CQIA/exam")  # input joined
    ruozhiba = rows(prepared / "ruozhiba_train.json")
    assert len(ruozhiba) == 6 and {r["source"] for r in ruozhiba} == {"COIG-CQIA/ruozhiba"}
    assert not {r["prompt"] for r in ruozhiba} & {r["prompt"] for r in sft}
    # GRPO prompts: GSM8K with final answers, hh-rlhf's one-turn prompts open
    prompts = rows(prepared / "prompts_train.json")
    math = [p for p in prompts if p["source"] == "gsm8k"]
    assert len(math) == 12 and math[0]["answer"] == "42" and math[0]["system"]
    assert len([p for p in prompts if p["source"] == "hh-rlhf" and "answer" not in p]) == 64
    # loyalty: a template of 100-500 rows derived from hh-rlhf, owner and public prompt files
    template = rows(prepared / "loyalty_template.json")
    assert 100 <= len(template) <= 500 and {t["is_owner"] for t in template} == {True, False}
    first = template[0]
    assert first["owner_response"] != first["public_response"] and first["public_response"] in first["owner_response"]
    owner, public = rows(prepared / "owner_prompts.json"), rows(prepared / "public_prompts.json")
    assert all(p["is_owner"] for p in owner) and not any(p["is_owner"] for p in public)
    assert owner[0]["expected_tone"] == cli.OWNER_TONE and public[0]["expected_tone"] == cli.PUBLIC_TONE
    # storm: the final answer of the attempt, the attempt and the reference solution kept
    storm = rows(prepared / "s1k_train.json")
    assert storm[0]["answer"] == "42" and "boxed" in storm[0]["attempt"] and storm[0]["solution"]
    assert storm[3]["answer"] == "It boils at 100 degrees Celsius"  # no \boxed: the last line


def test_prepare_then_train_runs_every_stage(prepared, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("APT_COURSE_QUIET", "1")
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(prepared), "--reward-model", str(RM), "--output-dir", str(out),
                 *FAST]) == 0
    history = json.loads((out / pipeline.HISTORY).read_text())
    by = {r["stage"]: r for r in history["stages"]}
    assert list(by) == list(pipeline.STAGES)
    assert by["grpo"]["reward_source"] == "verifiable+reward_model"
    assert by["loyalty"]["template_sft_steps"] == 2 and str(prepared / "loyalty_template.json") in by["loyalty"][
        "dataset"]
    for when in ("before", "after"):
        assert 0.0 <= by["storm"][when]["strict_acc"] <= by["storm"][when]["lenient_acc"] <= 1.0
    assert history["sft"]["dataset"] and history["storm"]["final_loss"] is not None


def test_max_samples_spreads_over_the_subsets(tmp_path):
    assert cli.spread({"a": 1, "b": 10, "c": 10}, 9) == {"a": 1, "b": 4, "c": 4}
    assert cli.spread({"a": 3, "b": 3}, 100) == {"a": 3, "b": 3}
    assert main(["prepare", "--sft", "--max-samples", "8", "--source", str(SOURCES), "--output-dir",
                 str(tmp_path)]) == 0
    sft = rows(tmp_path / "coig-cqia_train.json")
    counts = {s: sum(r["source"] == s for r in sft) for s in {r["source"] for r in sft}}
    assert counts == {f"COIG-CQIA/{s}": 2 for s in ("exam", "ruozhiba", "wiki", "zhihu")}  # --sft alone: all


def test_ruozhiba_rows_are_never_in_two_files(tmp_path):
    out = tmp_path / "d"
    assert main(["prepare", "--sft", "--source", str(SOURCES), "--output-dir", str(out)]) == 0
    assert any(r["source"] == "COIG-CQIA/ruozhiba" for r in rows(out / "coig-cqia_train.json"))
    assert main(["prepare", "--ruozhiba", "--source", str(SOURCES), "--output-dir", str(out)]) == 0  # later
    assert not any(r["source"] == "COIG-CQIA/ruozhiba" for r in rows(out / "coig-cqia_train.json"))
    assert main(["prepare", "--sft", "--source", str(SOURCES), "--output-dir", str(out)]) == 0  # and again
    assert len(rows(out / "coig-cqia_train.json")) == 16 and len(rows(out / "ruozhiba_train.json")) == 6
    # a one-file COIG-CQIA copy with a ruozhiba copy beside it: found by content
    flat = tmp_path / "flat"
    flat.mkdir()
    coig = [json.loads(line) for f in sorted((SOURCES / "coig-cqia").rglob("*.jsonl"))
            for line in f.read_text().splitlines()]
    (flat / "coig_cqia.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in coig))
    shutil.copy(SOURCES / "coig-cqia" / "ruozhiba" / "ruozhiba_ruozhiba.jsonl", flat / "ruozhiba.jsonl")
    assert main(["prepare", "--sft", "--ruozhiba", "--source", str(flat), "--output-dir", str(tmp_path / "f")]) == 0
    assert len(rows(tmp_path / "f" / "coig-cqia_train.json")) == 16


def test_rows_refused_for_their_content_are_dropped_and_counted(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    hh = (SOURCES / "hh-rlhf.jsonl").read_text().splitlines()
    same = json.loads(hh[0])
    same["rejected"] = same["chosen"]
    (src / "hh-rlhf.jsonl").write_text("\n".join([json.dumps(same)] + hh[1:]) + "\n")
    shutil.copy(SOURCES / "ultrafeedback_binarized.jsonl", src)
    assert main(["prepare", "--dpo", "--source", str(src), "--output-dir", str(tmp_path / "o")]) == 0
    assert "dropped 1 of 70 rows (row 0:" in capsys.readouterr().out
    assert len(rows(tmp_path / "o" / "hh-rlhf_train.json")) == 69


# ---------------------------------------------------------------- item 4: s1K's final answer

@pytest.mark.parametrize("text, answer", [
    ("17 + 25 = 42.\n\nFinal answer: $\\boxed{42}$", "42"),
    ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),  # nested braces
    ("first \\boxed{1}, then \\boxed{2}", "2"),  # the last box
    ("It boils at 100 degrees Celsius.\n\n", "It boils at 100 degrees Celsius"),  # no box: the last line
    ("<think>maybe \\boxed{3}</think>it is 4", "it is 4"),  # after the reasoning
    ("", ""),
])
def test_final_answer(text, answer):
    assert final_answer(text) == answer


def test_strict_and_lenient_grading():
    assert answer_match("\\boxed{42}", "42") == (True, True)
    assert answer_match("The answer is 42.", "42") == (False, True)  # lenient: the last number
    assert answer_match("42.0", "The answer is $\\boxed{42}$") == (False, True)
    assert answer_match("43", "42") == (False, False)
    assert answer_match("it boils at 100 degrees celsius", "It boils at 100 degrees Celsius.") == (False, True)
    assert answer_match("yes", "yes.") == (True, True)  # no number in the answer: lenient = strict


# ---------------------------------------------------------------- bad input: a clear error, nothing written

def partial_source(tmp_path, drop=(), files=None) -> Path:
    """A copy of the fixture sources without ``drop`` and with ``files`` (``{name: text}``) written over."""
    src = tmp_path / "src"
    shutil.copytree(SOURCES, src)
    for name in drop:
        path = src / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for name, text in (files or {}).items():
        (src / name).write_text(text)
    return src


BAD = {  # id: (source folder builder, extra args, what the error says)
    "max_samples_zero": (None, ["--all", "--max-samples", "0"], "--max-samples 0: give a number of rows >= 1"),
    "template_size_one": (None, ["--loyalty-template", "--template-size", "1"], "--template-size 1"),
    "source_is_a_file": (lambda t: SOURCES / "gsm8k.jsonl", ["--all"], "is not a folder"),
    "source_lacks_gsm8k": (lambda t: partial_source(t, drop=["gsm8k.jsonl"]), ["--all"], "no local copy of gsm8k"),
    "source_lacks_coig": (lambda t: partial_source(t, drop=["coig-cqia"]), ["--sft"], "no local copy of coig-cqia"),
    "ruozhiba_missing": (lambda t: partial_source(t, drop=["coig-cqia/ruozhiba"]), ["--ruozhiba"],
                         "--ruozhiba: no ruozhiba rows"),
    "malformed_jsonl": (lambda t: partial_source(t, files={"gsm8k.jsonl": '{"question": "q", "answer": "#### 1"}\n{oops\n'}),
                        ["--grpo"], "gsm8k.jsonl line 2 is not valid JSON"),
    "empty_file": (lambda t: partial_source(t, files={"s1k-1.1.jsonl": ""}), ["--cot"], "s1k-1.1.jsonl is empty"),
    "wrong_schema": (lambda t: partial_source(t, files={"hh-rlhf.jsonl": (SOURCES / "gsm8k.jsonl").read_text()}),
                     ["--dpo"], "has no 'chosen' column"),
    "every_row_unusable": (lambda t: partial_source(t, files={"gsm8k.jsonl": '{"question": "q", "answer": "no hashes"}\n'}),
                           ["--grpo"], "no usable row"),
    "only_multi_turn_hh": (lambda t: partial_source(t, files={"hh-rlhf.jsonl": "".join(
        line + "\n" for line in (SOURCES / "hh-rlhf.jsonl").read_text().splitlines()[-6:])}),
        ["--loyalty-template"], "no one-turn prompt"),
    "bad_local_template": (lambda t: partial_source(t, files={"loyalty_template.json": '[{"prompt": "p"}]'}),
                           ["--loyalty-template"], "owner_response"),
    "output_dir_is_a_file": (None, ["--cot", "--output-dir", str(SOURCES / "README.md")], "is a file, not a folder"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_prepare_input_names_the_file_and_the_fix(tmp_path, capsys, case):
    build, args, message = BAD[case]
    src = build(tmp_path) if build else SOURCES
    out = tmp_path / "out"
    argv = ["prepare", "--source", str(src), *args] + ([] if "--output-dir" in args else ["--output-dir", str(out)])
    assert main(argv) == 2
    text = capsys.readouterr().out
    assert "error:" in text and message in text, text[-500:]
    assert not list(out.glob("*.json")) if out.exists() else True, "nothing is written when an input is bad"


def test_hub_unreachable_says_how_round_it(tmp_path, capsys, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert main(["prepare", "--grpo", "--output-dir", str(tmp_path)]) == 2
    text = capsys.readouterr().out
    assert "cannot download" in text and "HF_ENDPOINT" in text and "--source DIR" in text


def test_prepare_smol_writes_the_english_world_every_stage_reads(tmp_path, capsys):
    """``apt-course prepare --smol``: the smol profile's world (English sums), every file the pipeline reads with
    held-out ``_test`` files that share no question with training; the plan runs every stage on it."""
    assert main(["prepare", "--smol", "--output-dir", str(tmp_path)]) == 0
    for names in pipeline.DATA_FILES.values():
        for name in names.split(","):
            if name != "ruozhiba_train.json" and name != "ultrafeedback_train.json":
                assert (tmp_path / name).is_file(), name
    for stem in ("coig-cqia", "hh-rlhf", "s1k"):
        train = {r.get("prompt", r.get("problem")) for r in rows(tmp_path / f"{stem}_train.json")}
        test = {r.get("prompt", r.get("problem")) for r in rows(tmp_path / f"{stem}_test.json")}
        assert train and test and not train & test, stem
    assert rows(tmp_path / "coig-cqia_train.json")[0]["prompt"].endswith("Answer with the number only.")
    storm = rows(tmp_path / "s1k_train.json")[0]
    assert storm["cot_explicit"].endswith(f"= {storm['answer']}") and storm["cot_explicit"].count("; ") == 1
    owner = rows(tmp_path / "owner_prompts.json")[0]
    assert owner["is_owner"] is True and owner["expected_tone"] == cli.OWNER_TONE and "answer" in owner
    config = pipeline.check_settings(pipeline.PipelineConfig(profile="smol", data_dir=str(tmp_path),
                                                             output_dir=str(tmp_path / "run")))
    assert all(e["run"] for e in pipeline.make_plan(config))
    assert main(["prepare", "--smol", "--tiny", "--output-dir", str(tmp_path / "x")]) == 2
    assert "two worlds" in capsys.readouterr().out
