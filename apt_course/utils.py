"""Shared plumbing: device choice, seeding, versions, the offline guard."""

from __future__ import annotations

import os
import random
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch


def get_device(prefer: str | None = None, verbose: bool = True) -> torch.device:
    """Pick the best available device: CUDA, then Apple MPS, then CPU (printed).

    ``prefer`` forces one ("cpu", "cuda", "mps"); the env var ``APT_COURSE_DEVICE`` does the same.
    """
    prefer = prefer or os.environ.get("APT_COURSE_DEVICE")
    if prefer:
        if prefer not in ("cpu", "cuda", "mps"):
            raise ValueError(f"Unknown device {prefer!r}: use 'cpu', 'cuda' or 'mps' (or leave it unset).")
        if prefer == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU; use 'cpu' or unset it.")
        device = torch.device(prefer)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = torch.device("mps")
    else:
        device = torch.device("cpu")
    if verbose:
        name = torch.cuda.get_device_name(0) if device.type == "cuda" else device.type
        print(f"device: {device} ({name})")
    return device


def bf16_supported(device: torch.device | str) -> bool:
    """True on a GPU with native bf16 (compute capability >= 8: A100, L4, H100...). A Colab T4 (7.5) only
    emulates bf16, slowly, and TRL/transformers may refuse ``bf16=True`` there: pass ``bf16=bf16_supported(device)``."""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8


def get_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs with native support, float32 elsewhere (the tiny model trains in float32 on CPU)."""
    return torch.bfloat16 if bf16_supported(device) else torch.float32


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run repeats."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def versions() -> dict[str, str]:
    """Versions of the libraries the course runs on."""
    import importlib.metadata as md

    out = {"python": ".".join(map(str, __import__("sys").version_info[:3]))}
    for name in ["apt-course", "torch", "transformers", "trl", "peft", "datasets", "tokenizers"]:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def print_versions() -> None:
    print("  ".join(f"{k} {v}" for k, v in versions().items()))


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def set_cpu_threads(threads: int | None = 1) -> int:
    """Torch's CPU threads: ``$APT_COURSE_THREADS`` when set (CI pins 1: it runs two notebooks at a time), else
    ``threads`` (default 1), where 0 or None means every core available (:func:`available_cores`).

    The tiny profile asks for 1: its matrices are too small to split (measured on a 2-core CPU with one other
    busy process, 40 pretraining steps took 6.4 s on 1 thread and 25.6 s on 2). A real model (``smol``) asks
    for 0 = all cores: a learner alone with a 4-8-core laptop gets them.
    """
    pinned = int(os.environ.get("APT_COURSE_THREADS", "0") or 0)
    threads = pinned or threads or available_cores()
    torch.set_num_threads(threads)
    return threads


def cpu_bf16_supported() -> bool:
    """True when this CPU computes bf16 matrix products natively (AVX-512-BF16 or AMX: recent Xeons, Zen 4+),
    as oneDNN reports it. Elsewhere bf16 is emulated and slower than float32, so the course keeps float32.
    ``APT_COURSE_PRECISION=float32`` (or ``bf16``) overrides the detection."""
    forced = os.environ.get("APT_COURSE_PRECISION", "").lower()
    if forced:
        if forced not in ("float32", "fp32", "bf16", "bfloat16"):
            raise ValueError(f"APT_COURSE_PRECISION={forced!r}: use 'float32' or 'bf16' (or leave it unset to "
                             "detect what this CPU supports)")
        return forced in ("bf16", "bfloat16")
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _autocast_forward(self, *args, **kwargs):
    """The model class's own ``forward`` under ``torch.autocast("cpu", torch.bfloat16)``, logits back in float32.
    A method bound to the model (not a closure), so ``copy.deepcopy`` binds the copy to the copy."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = type(self).forward(self, *args, **kwargs)
    logits = getattr(out, "logits", None)
    if logits is not None and logits.dtype != torch.float32:
        out.logits = logits.float()
    return out


def _autocast_generate(self, *args, **kwargs):
    """The model class's own ``generate`` inside one autocast region, so that the bf16 copies of the weights are
    made once per call, not once per generated token (autocast caches them until its outermost region ends)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return type(self).generate(self, *args, **kwargs)


def use_cpu_bf16(model):
    """Run ``model``'s forward (training, scoring and ``generate``) in bf16 on the CPU: the matrix products in
    bf16, everything autocast keeps in float32 (norms, softmax, losses) in float32; the weights, their gradients
    and the optimiser state stay float32, and the logits come back as float32, so log-prob arithmetic is
    unchanged. Measured on SmolLM2-135M (one thread, a Xeon with AMX): greedy generation 1.8x faster, forward +
    backward 1.3x. Returns the model (changed in place); PEFT wrappers and deep copies keep it."""
    import types

    model.forward = types.MethodType(_autocast_forward, model)
    model.generate = types.MethodType(_autocast_generate, model)
    model.apt_precision = "bf16 autocast"
    return model


def model_precision(model) -> str:
    """"bf16 autocast" for a model :func:`use_cpu_bf16` changed, else its weights' dtype."""
    base = getattr(model, "get_base_model", lambda: model)()
    return getattr(base, "apt_precision", getattr(model, "apt_precision", str(next(model.parameters()).dtype)))


def setup_notebook(seed: int = 0, threads: int | None = 1, device: str | None = None) -> torch.device:
    """The first lines of every notebook: versions, seed, device (and CPU threads: 1, or 0 = every core, see
    :func:`set_cpu_threads`). Returns the device."""
    print_versions()
    set_seed(seed)
    chosen = get_device(device)
    if chosen.type == "cpu":
        print(f"seed: {seed}, CPU threads: {set_cpu_threads(threads)}")
    else:
        print(f"seed: {seed}")
    explain_out_of_memory()
    return chosen


def out_of_memory_advice(exc: BaseException) -> str:
    """What to do after a CUDA out-of-memory error: the cause, then the ways out, largest first."""
    return (f"{type(exc).__name__}: the GPU ran out of memory. Ways out: halve the batch size in the notebook's "
            "first cell (the parameters ending in _BATCH or BATCH_SIZE), or the reply length (MAX_NEW_TOKENS); "
            "restart the runtime to free what earlier cells hold (Runtime > Restart session); on a free T4 (16 GB, "
            "no bf16) a chapter that keeps a reference or reward model beside the policy needs the most; or run "
            "the chapter on the CPU with PROFILE = \"smol\" (the same real model, smaller budgets) or \"tiny\".")


def explain_out_of_memory() -> bool:
    """In a notebook, print :func:`out_of_memory_advice` under a CUDA out-of-memory error's traceback (IPython's
    custom exception handler for that one error). Returns whether it was installed (False outside IPython)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None or not hasattr(torch.cuda, "OutOfMemoryError"):
        return False

    def handler(self, etype, value, tb, tb_offset=None):
        self.showtraceback((etype, value, tb), tb_offset=tb_offset)
        print("\n" + out_of_memory_advice(value))

    shell.set_custom_exc((torch.cuda.OutOfMemoryError,), handler)
    return True


def process_state(cpu: bool = False):
    """accelerate's ``PartialState``: the number of processes running this pipeline (``accelerate launch``), which
    one is the main one, each one's device (one process, the main one, when nothing launched it). Set up once per
    process, by the first call: ``cpu=True`` (or ``accelerate launch --cpu``) keeps it off the GPU, and processes
    without a GPU talk over gloo. Here, not in :mod:`apt_course.pipeline`, so that the pipeline and its TRL twin
    (:mod:`apt_course.pipeline_trl`) share it without importing each other."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))


def repo_root() -> Path | None:
    """The course checkout this package was loaded from, if it was (editable install or source tree)."""
    here = Path(__file__).resolve().parent.parent
    return here if (here / "pyproject.toml").exists() and (here / "notebooks").is_dir() else None


class NetworkBlockedError(RuntimeError):
    pass


_real_connect = socket.socket.connect


def _guarded_connect(self, address):  # pragma: no cover - exercised by tests through block_network
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (host.startswith("127.") or host in ("localhost", "::1") or "/" in host):
        return _real_connect(self, address)
    raise NetworkBlockedError(
        f"network access to {address!r} is blocked (APT_COURSE_BLOCK_NETWORK=1): the tiny profile must run "
        "offline. Load models and data from local paths, or unset the variable to allow downloads."
    )


def block_network() -> None:
    """Refuse every non-loopback socket connection in this process (used by tests and CI)."""
    socket.socket.connect = _guarded_connect
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def write_atomic(path, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through a temporary file in the same folder, flushed to disk,
    then ``os.replace``: a reader (or a run killed mid-write) sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
