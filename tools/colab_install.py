"""Install the course into a Colab runtime (or any Python that has torch): what every notebook's install cell runs.

    python tools/colab_install.py [EXTRA ...]      # e.g. `serve` for chapter 15

It installs the package from this checkout (editable, so the course's data files are found) with only the base
dependencies and the extras named: no JupyterLab, no test tools. The runtime's own torch is kept (the course
needs any torch 2.3-2.x); an older torch stops the install with the way out, before pip changes anything. At the
end it prints how long it took and every package it installed or upgraded, so a teacher sees what changed in
Colab's environment.
"""

import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WATCHED = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "tokenizers", "numpy", "pandas",
           "matplotlib", "openai")
MIN_TORCH = (2, 3)


def versions(names=WATCHED) -> dict[str, str | None]:
    """The installed version of each package, None where it is missing."""
    found = {}
    for name in names:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def release(version: str) -> tuple[int, ...]:
    """``"2.9.0+cu126"`` -> ``(2, 9)``: the major and minor numbers."""
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


def check_torch(version: str | None) -> None:
    """Stop before pip runs when torch is missing or older than the course needs: pip would otherwise download a
    multi-GB torch into a runtime whose CUDA build it may not match."""
    if version is None:
        raise SystemExit("torch is not installed in this runtime: on Colab pick a runtime that has it (every standard "
                         "one does); elsewhere `pip install torch` first (the CPU build: add --index-url "
                         "https://download.pytorch.org/whl/cpu), then run this cell again")
    if release(version) < MIN_TORCH:
        raise SystemExit(f"this runtime's torch {version} is older than the course needs "
                         f"({'.'.join(map(str, MIN_TORCH))} or newer): on Colab use Runtime > Change runtime type "
                         f"with the latest runtime version; elsewhere `pip install -U 'torch>=2.3,<3'`, then restart")


def changes(before: dict, after: dict) -> list[str]:
    """One line per package the install added or changed."""
    return [f"{name} {before[name] or '(new)'} -> {after[name]}" for name in after
            if after[name] != before[name] and after[name] is not None]


def main(extras: list[str]) -> int:
    before = versions()
    check_torch(before["torch"])
    target = f"{ROOT}[{','.join(extras)}]" if extras else str(ROOT)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", target])
    if done.returncode:
        raise SystemExit(f"`pip install -e {target}` failed (exit {done.returncode}); the lines above say why")
    after = versions()
    changed = changes(before, after)
    print(f"installed the course from {ROOT} in {time.perf_counter() - start:.0f} s; torch {after['torch']} kept"
          if after["torch"] == before["torch"] else f"installed the course; torch changed: {before['torch']} -> "
          f"{after['torch']} (restart the runtime)")
    print("upgraded or added: " + ("; ".join(changed) if changed else "nothing among " + ", ".join(WATCHED)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
