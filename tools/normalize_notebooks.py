"""Make committed notebooks uniform: outputs stripped, python3 kernelspec, no editor metadata, and every Colab badge
and install cell written from the course's one address (``[project.urls] Repository`` in pyproject.toml).

    python tools/normalize_notebooks.py            # every notebook in notebooks/
    python tools/normalize_notebooks.py --check    # exit 1 if any would change (used by tests)
    python tools/normalize_notebooks.py --repo https://github.com/my-school/apt-course
                                                   # point the whole course at a fork or a mirror
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
EXTRAS = {"ch15_serving": ["serve"]}  # what a chapter installs beyond the base package (tools/colab_install.py)
# Every notebook's setup cell opens with this block (Colab: clone the course with its data, install it).
INSTALL = """try:
    import apt_course  # noqa: F401
except ImportError:  # Colab or a fresh kernel: fetch the course (with its data) and install it
    import os
    import subprocess
    import sys
    COURSE = "{repo}"  # the course's address (a fork: tools/normalize_notebooks.py --repo URL)
    HOME = "/content/apt-course" if os.path.isdir("/content") else os.path.expanduser("~/apt-course")
    if not os.path.isdir(HOME) and subprocess.run(["git", "clone", "-q", "--depth", "1", COURSE, HOME]).returncode:
        raise RuntimeError(f"could not clone the course from {{COURSE}} (the lines above say why): if your class uses "
                           "its own copy, set COURSE to its address in this cell")
    subprocess.run([sys.executable, f"{{HOME}}/tools/colab_install.py"{extras}], check=True)
    sys.path.insert(0, HOME)  # an editable install is only on sys.path after a restart
"""
BADGE = re.compile(r"https://colab\.research\.google\.com/github/[^/]+/[^/]+/blob/")
REPO_LINE = re.compile(r'^Repository = "([^"]+)"$', re.M)


def course_address() -> str:
    """The course's repository address, from pyproject.toml."""
    found = REPO_LINE.search(PYPROJECT.read_text())
    if not found:
        raise SystemExit(f"{PYPROJECT} has no `Repository = \"...\"` line under [project.urls]: add one")
    return found.group(1)


def set_course_address(url: str) -> None:
    """Write ``url`` as the course's address in pyproject.toml (checked: an https git address)."""
    if not re.fullmatch(r"https://[\w.-]+/[\w.-]+/[\w.-]+?(\.git)?/?", url):
        raise SystemExit(f"{url!r} is not a repository address like https://github.com/OWNER/NAME")
    PYPROJECT.write_text(REPO_LINE.sub(f'Repository = "{url.rstrip("/").removesuffix(".git")}"',
                                       PYPROJECT.read_text()))


def install_block(repo: str, name: str) -> str:
    """The install block of notebook ``name``, cloning ``repo``."""
    extras = "".join(f", {e!r}".replace("'", '"') for e in EXTRAS.get(name, []))
    return INSTALL.format(repo=repo, extras=extras)


def badge_target(repo: str) -> str | None:
    """The Colab badge's prefix for ``repo`` (Colab opens notebooks from GitHub only: None for another host)."""
    found = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+)", repo)
    return f"https://colab.research.google.com/github/{found[1]}/{found[2]}/blob/" if found else None


def canonical_install(source: str, install: str) -> str:
    """Replace a leading ``try: import apt_course / except ImportError:`` block with ``install``."""
    lines = source.splitlines(keepends=True)
    if not lines or not lines[0].startswith("try:") or "import apt_course" not in "".join(lines[:2]):
        return source
    i = next((k for k, line in enumerate(lines) if line.startswith("except ImportError")), None)
    if i is None:
        return source
    j = i + 1
    while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
        j += 1
    return install + "".join(lines[j:])


def normalize(nb: dict, name: str = "", repo: str | None = None) -> dict:
    """``nb`` uniform; with ``repo``, its badge and install cell point there (notebook ``name`` picks the extras)."""
    nb["metadata"] = {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    for cell in nb["cells"]:
        tags = cell.get("metadata", {}).get("tags")
        cell["metadata"] = {"tags": tags} if tags else {}
        cell.pop("id", None)
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
            source = "".join(cell["source"])
            if repo:
                source = canonical_install(source, install_block(repo, name))
            cell["source"] = source.splitlines(keepends=True)
        elif repo and badge_target(repo):
            cell["source"] = BADGE.sub(badge_target(repo), "".join(cell["source"])).splitlines(keepends=True)
    nb["nbformat"], nb["nbformat_minor"] = 4, 4
    return nb


def main() -> int:
    check = "--check" in sys.argv
    if "--repo" in sys.argv:
        i = sys.argv.index("--repo")
        if i + 1 >= len(sys.argv):
            raise SystemExit("--repo needs an address: --repo https://github.com/OWNER/NAME")
        set_course_address(sys.argv[i + 1])
    repo = course_address()
    if not badge_target(repo):
        print(f"{repo} is not on GitHub: the install cells clone it, but Colab badges open GitHub repositories only, "
              "so they are left as they are")
    changed = []
    for path in sorted(ROOT.glob("notebooks/*.ipynb")):
        text = path.read_text()
        new = json.dumps(normalize(json.loads(text), path.stem, repo), indent=1, ensure_ascii=False) + "\n"
        if new != text:
            changed.append(path.name)
            if not check:
                path.write_text(new)
    if changed:
        print(("would change: " if check else "normalized: ") + ", ".join(changed))
    return 1 if check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
