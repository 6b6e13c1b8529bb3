"""Reading the APT system's JSON interchange files: one object with a list under a known key, e.g.
``{"instructions": [...]}``, ``{"pairs": [...]}``, ``{"prompts": [...]}``."""

from __future__ import annotations

import json
from pathlib import Path


def read_apt_json(source, key: str, what: str) -> list:
    """The list under ``key`` in an APT JSON file (a path, or the already parsed dict).

    ``what`` names the format in error messages (e.g. ``"APT pair"``). A missing or empty file, invalid
    JSON, or an object without ``key`` is a clear error that shows the expected shape.
    """
    shape = f'{{"{key}": [...]}}'
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"{what} file {path} is empty: it should hold {shape}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} file {path} is not valid JSON ({e}); it should hold {shape}") from None
    else:
        data = source
    if not isinstance(data, dict) or key not in data:
        got = f"keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
        raise KeyError(f'an {what} file is a JSON object with a "{key}" list, {shape}; got {got}')
    return data[key]
