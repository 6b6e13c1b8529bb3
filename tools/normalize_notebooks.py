"""Make committed notebooks uniform: outputs stripped, python3 kernelspec, no editor metadata.

    python tools/normalize_notebooks.py            # every notebook in notebooks/
    python tools/normalize_notebooks.py --check    # exit 1 if any would change (used by tests)
"""

import json
import sys
from pathlib import Path

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
# Every notebook's setup cell opens with this block (Colab: clone the course with its data, install it).
INSTALL = """try:
    import apt_course  # noqa: F401
except ImportError:  # Colab or a fresh kernel: fetch the course (with its data) and install it
    import subprocess
    import sys
    subprocess.run("git clone -q --depth 1 https://github.com/apt-course/apt-course /content/apt-course && "
                   f"{sys.executable} -m pip install -q -e /content/apt-course", shell=True, check=True)
    sys.path.insert(0, "/content/apt-course")  # an editable install is only on sys.path after a restart
"""


def canonical_install(source: str) -> str:
    """Replace a leading ``try: import apt_course / except ImportError:`` block with INSTALL."""
    lines = source.splitlines(keepends=True)
    if not lines or not lines[0].startswith("try:") or "import apt_course" not in "".join(lines[:2]):
        return source
    i = next((k for k, line in enumerate(lines) if line.startswith("except ImportError")), None)
    if i is None:
        return source
    j = i + 1
    while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
        j += 1
    return INSTALL + "".join(lines[j:])


def normalize(nb: dict) -> dict:
    nb["metadata"] = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    for cell in nb["cells"]:
        tags = cell.get("metadata", {}).get("tags")
        cell["metadata"] = {"tags": tags} if tags else {}
        cell.pop("id", None)
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
            source = canonical_install("".join(cell["source"]))
            cell["source"] = source.splitlines(keepends=True)
    nb["nbformat"], nb["nbformat_minor"] = 4, 4
    return nb


def main() -> int:
    check = "--check" in sys.argv
    changed = []
    for path in sorted(Path(__file__).resolve().parent.parent.glob("notebooks/*.ipynb")):
        text = path.read_text()
        new = json.dumps(normalize(json.loads(text)), indent=1, ensure_ascii=False) + "\n"
        if new != text:
            changed.append(path.name)
            if not check:
                path.write_text(new)
    if changed:
        print(("would change: " if check else "normalized: ") + ", ".join(changed))
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
