"""The gpu profile's failures, simulated on a CPU: each says its cause and the way out, before work is spent."""

import pytest
import torch

from apt_course.profiles import get_profile, load_model
from apt_course.utils import explain_out_of_memory, out_of_memory_advice


@pytest.fixture
def no_stand_ins(monkeypatch):
    for key in ("APT_COURSE_MODEL", "APT_COURSE_REWARD_MODEL", "APT_COURSE_PROFILE_OVERRIDES"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_the_gpu_profile_without_a_gpu_says_which_profile_to_use(no_stand_ins):
    with pytest.raises(RuntimeError, match=r"no GPU.*Change runtime type.*PROFILE = \"smol\""):
        load_model(get_profile("gpu", resolve=False), device="cpu")


def test_a_model_that_cannot_be_downloaded_names_it_and_the_way_out(no_stand_ins):
    profile = get_profile("gpu", resolve=False, model="no-such-org/no-such-model-4711", scale=0.01)
    with pytest.raises(OSError, match=r"(?s)'no-such-org/no-such-model-4711'.*Hugging Face Hub.*APT_COURSE_MODEL"):
        load_model(profile, device="cpu")


def test_out_of_memory_in_a_notebook_prints_the_way_out(capsys):
    advice = out_of_memory_advice(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert "batch size" in advice and "Restart session" in advice and 'PROFILE = "smol"' in advice
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    try:
        assert explain_out_of_memory()
        shell.run_cell("import torch\nraise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2 GiB')")
        out = capsys.readouterr().out
        assert "Tried to allocate" in out and "halve the batch size" in out
        shell.run_cell("raise ValueError('another error')")  # other errors keep IPython's own handling
        assert "halve the batch size" not in capsys.readouterr().out
    finally:
        shell.set_custom_exc((), None)
        InteractiveShell.clear_instance()


def test_explain_out_of_memory_is_a_no_op_outside_a_notebook():
    assert explain_out_of_memory() is False
