import pytest
import torch

from apt_course.model import count_parameters, load_pretrained, make_tiny_model, save_model
from apt_course.profiles import get_profile, load_model
from apt_course.tokenizer import build_tokenizer


def test_tiny_model_size_and_save_load_gives_same_logits(tmp_path):
    tok = build_tokenizer()
    model = make_tiny_model(tok, seed=0).eval()
    assert 0.7e6 < count_parameters(model) < 1.0e6
    save_model(model, tok, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").exists() and (tmp_path / "m" / "tokenizer.json").exists()
    loaded, tok2 = load_pretrained(tmp_path / "m")
    ids = torch.tensor([tok("<|user|>add 3 5<|assistant|>8")["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits, atol=1e-6)
    assert tok2.chat_template == tok.chat_template


def test_gpu_profile_path_loads_a_local_model_through_the_same_calls(tmp_path):
    """The GPU profile names a Hub id; offline we point it at a saved folder: same from_pretrained calls."""
    tok = build_tokenizer()
    save_model(make_tiny_model(tok, seed=1), tok, tmp_path / "real")
    profile = get_profile("gpu", model=str(tmp_path / "real"))
    model, tok2 = load_model(profile)
    assert model.config.model_type == "llama" and tok2.pad_token is not None
    assert get_profile("gpu").model.startswith("HuggingFaceTB/")


def test_bad_profile_and_missing_directory_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown profile 'laptop'"):
        get_profile("laptop")
    with pytest.raises(TypeError, match="unknown profile fields"):
        get_profile("tiny", modle="x")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained("./checkpoints/missing")


def test_shipped_checkpoints_load():
    from apt_course.checkpoints import checkpoint_path

    for name in ("base", "sft"):
        model, tok = load_pretrained(checkpoint_path(name))
        assert model.config.vocab_size == len(tok)
    with pytest.raises(ValueError, match="unknown checkpoint"):
        checkpoint_path("dpo")


def test_save_model_is_atomic_and_keeps_the_old_model_when_a_save_fails(tmp_path):
    tok = build_tokenizer()
    first = make_tiny_model(tok, seed=0)
    path = save_model(first, tok, tmp_path / "m")
    before = (path / "model.safetensors").read_bytes()

    class BrokenTokenizer:
        def save_pretrained(self, where):
            raise OSError("disk full")

    import pytest

    with pytest.raises(OSError, match="disk full"):
        save_model(make_tiny_model(tok, seed=1), BrokenTokenizer(), path)
    assert (path / "model.safetensors").read_bytes() == before  # the old model is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]   # and no half-written folder is left
    save_model(make_tiny_model(tok, seed=1), tok, path)          # a good save replaces it whole
    assert (path / "model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_profile_steps_scales_a_budget_with_a_floor():
    assert get_profile("gpu").steps(200) == 200
    assert get_profile("gpu", scale=0.02).steps(200) == 4
    assert get_profile("gpu", scale=0.02).steps(10) == 1
    assert get_profile("gpu", scale=0.02).steps(10, minimum=2) == 2
