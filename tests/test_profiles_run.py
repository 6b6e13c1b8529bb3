"""The real-model profiles, executed: every notebook on the ``gpu`` profile with local stand-ins for its Hub
names (``python -m apt_course stand-ins``: a small random Llama with SmolLM2's tokenizer and chat template, the
fixtures in the real datasets' schemas, step budgets scaled down), so that a notebook that would break on Colab
breaks here first; and every chapter that runs on the ``smol`` profile (04-15), the real
SmolLM2-135M-Instruct on this CPU in bf16 where the CPU has it, each asserting its measured before/after inside the
notebook.

The executed copies go to ``runs/profiles/`` (ignored by git) for reading after a failure."""

import os
import time
from pathlib import Path

import pytest

from apt_course.runner import execute_notebook, find_notebooks

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "profiles"
SMOL_CHAPTERS = ("ch04", "ch05", "ch06", "ch07", "ch08", "ch09", "ch10", "ch11", "ch12", "ch13", "ch14", "ch15")
# A stand-in run proves the gpu code path, not a result (a random model learns nothing): the chapters whose
# evaluation sets and request counts are not step budgets (the profile's scale does not shrink them) get smaller
# ones here, so that their stand-in runs take seconds, not minutes. Colab runs the notebooks' own defaults.
STAND_IN_PARAMETERS = {
    "ch07_dpo": {"TRAIN_PAIRS": 200, "TEST_PAIRS": 24},
    "ch15_serving": {"LOAD_REQUESTS": 8, "FEEDBACK_PROMPTS": 16, "ROUNDS": 2, "AB_REQUESTS": 8, "FINAL_PER_ARM": 8,
                     "EVAL_SIZE": 16},
}


@pytest.fixture(scope="session")
def smol_path(real_model_packages):
    """The converted SmolLM2 in the course's cache (built once, under a lock shared by pytest-xdist's workers)."""
    from filelock import FileLock

    from apt_course.real_model import cache_dir, smol_model_path

    cache_dir().mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir() / ".prepare.lock")):
        return smol_model_path(build_if_missing=True)


@pytest.fixture(scope="session")
def stand_ins(smol_path, tmp_path_factory):
    """The environment variables of freshly written stand-ins (one folder per xdist worker)."""
    from apt_course.standins import make_stand_ins

    return make_stand_ins(tmp_path_factory.mktemp("stand-ins") / "gpu", tokenizer_from=smol_path)


def _run(path: Path, profile: str, monkeypatch, tmp_path, **parameters) -> float:
    monkeypatch.setenv("APT_COURSE_RESULTS", str(tmp_path))  # the figures of these runs stay out of results/
    start = time.perf_counter()
    execute_notebook(path, {"PROFILE": profile, "SEED": 0, **parameters}, OUT / profile,
                     timeout=1800)  # per cell: ch13 trains in one
    return time.perf_counter() - start


@pytest.mark.parametrize("path", find_notebooks(), ids=lambda p: p.stem)
def test_notebook_on_the_gpu_profile_with_stand_ins(path, stand_ins, monkeypatch, tmp_path):
    for key, value in stand_ins.items():
        monkeypatch.setenv(key, value)  # the kernel inherits them: the profile resolves to the stand-ins
    parameters = dict(STAND_IN_PARAMETERS.get(path.stem, {}))
    if path.stem == "ch10_constitutional_ai":  # the judge loaded by name, as a Colab run names a larger one
        parameters["JUDGE"] = stand_ins["APT_COURSE_MODEL"]
    seconds = _run(path, "gpu", monkeypatch, tmp_path, **parameters)
    print(f"{path.stem} on the gpu profile (stand-ins): {seconds:.0f} s")


@pytest.mark.parametrize("path", find_notebooks(list(SMOL_CHAPTERS)), ids=lambda p: p.stem)
def test_notebook_on_the_real_smollm2(path, smol_path, monkeypatch, tmp_path):
    for key in [k for k in os.environ if k in ("APT_COURSE_MODEL", "APT_COURSE_REWARD_MODEL",
                                               "APT_COURSE_PROFILE_OVERRIDES") or k.startswith("APT_COURSE_DATASET_")]:
        monkeypatch.delenv(key)  # the real model from the cache, nothing standing in
    print(f"{path.stem} on the smol profile: {_run(path, 'smol', monkeypatch, tmp_path):.0f} s")
