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


def set_cpu_threads(threads: int | None = None) -> int:
    """Torch's CPU threads: ``threads``, else ``$APT_COURSE_THREADS``, else 1.

    One thread is the default because the tiny model's matrices are too small to split: measured on a
    2-core CPU with one other busy process, 40 pretraining steps took 6.4 s on 1 thread and 25.6 s on 2.
    """
    threads = threads or int(os.environ.get("APT_COURSE_THREADS", "0")) or 1
    torch.set_num_threads(threads)
    return threads


def setup_notebook(seed: int = 0, threads: int | None = None, device: str | None = None) -> torch.device:
    """The first lines of every notebook: versions, seed, device (and CPU threads). Returns the device."""
    print_versions()
    set_seed(seed)
    chosen = get_device(device)
    if chosen.type == "cpu":
        print(f"seed: {seed}, CPU threads: {set_cpu_threads(threads)}")
    else:
        print(f"seed: {seed}")
    return chosen


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
