"""Every test, and every notebook kernel nbmake starts (it inherits the environment), runs offline."""

import os
import sys
from pathlib import Path

os.environ["APT_COURSE_BLOCK_NETWORK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so that `import solutions.chNN` works

import pytest  # noqa: E402

from apt_course.tokenizer import build_tokenizer  # noqa: E402
from apt_course.utils import block_network, set_cpu_threads  # noqa: E402

block_network()
set_cpu_threads()  # the tiny model runs fastest on one thread (see set_cpu_threads)


@pytest.fixture(scope="session")
def tok():
    """The course tokenizer, built once for the whole test session."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_path(tok, tmp_path_factory):
    """A fresh tiny model (seed 0) saved with its tokenizer: what the TRL trainers load by path."""
    from apt_course.model import make_tiny_model, save_model

    return str(save_model(make_tiny_model(tok, seed=0), tok, tmp_path_factory.mktemp("tiny")))
