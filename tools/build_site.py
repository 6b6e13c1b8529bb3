"""Build a static site of the course with every chapter executed: plots, tables, samples and exercise feedback.

    python tools/build_site.py                              # every chapter, tiny profile, seed 0 -> site/
    python tools/build_site.py --chapters ch00 ch01 --out /tmp/site
    python tools/build_site.py --from-runs runs/tiny-seed0  # executed copies already there (`apt_course run --out`)

Each notebook is executed in a fresh kernel (``apt_course.runner``, the engine of ``python -m apt_course run``)
with ``PROFILE="tiny"`` and ``SEED`` injected, then converted to one self-contained HTML page by nbconvert (figures
embedded as data URIs; only MathJax comes from its CDN, or from ``--mathjax-url``). ``index.html`` lists the
chapters with what each teaches, the figures the README's seed sweep measured, and the figures this build's run
recorded (``results/<chapter>.json``). Every page links to the index and to the previous and next chapter, and to
its executed ``.ipynb``. The site is built in a temporary folder next to ``--out`` and renamed into place, so an
interrupted build leaves the previous site whole.
"""

from __future__ import annotations

import argparse
import ast
import html
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BADGE = re.compile(r"\[!\[Open In Colab\]\([^)]*\)\]\(([^)]+)\)")  # the badge image is remote: keep the link only
ROW = re.compile(r"^\| (\d\d) \| `(ch\d\d_\w+)` \| (.*?) \| (.*?) \| (.*?) \|$", re.M)

TEMPLATE = """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{% block extra_css %}<style>
nav.apt-nav { display: flex; justify-content: space-between; gap: 1em; max-width: 1000px; margin: 0.8em auto;
  padding: 0.5em 1em; font-family: sans-serif; font-size: 14px; border-bottom: 1px solid #ddd; }
nav.apt-nav.bottom { border-bottom: none; border-top: 1px solid #ddd; }
p.apt-run { max-width: 1000px; margin: 0 auto; padding: 0 1em; font: 13px sans-serif; color: #555; }
</style>{% endblock extra_css %}
{%- block body_header -%}
{{ super() }}
{{ resources.site.nav | replace('class="apt-nav"', 'class="apt-nav top"') }}
<p class="apt-run">{{ resources.site.run }}</p>
{%- endblock body_header -%}
{% block body_footer %}
{{ resources.site.nav | replace('class="apt-nav"', 'class="apt-nav bottom"') }}
{{ super() }}
{% endblock body_footer %}
"""


class SiteError(RuntimeError):
    """A chapter that cannot go on the site: unknown, not executed, or failed (the message says how to rerun it)."""


def chapter_title(nb) -> str:
    """The first markdown heading, without its ``#``: ``Chapter 00 — Setup and the tiny world``."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    raise SiteError("the notebook has no markdown heading to title its page")


def run_parameters(nb) -> dict:
    """``PROFILE`` and ``SEED`` as the run used them: the injected-parameters cell wins over the parameters cell."""
    found = {}
    for tag in ("parameters", "injected-parameters"):
        for cell in nb.cells:
            if cell.cell_type == "code" and tag in cell.get("metadata", {}).get("tags", []):
                for node in ast.parse(cell.source).body:
                    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                        name = node.targets[0].id
                        if name in ("PROFILE", "SEED") and isinstance(node.value, ast.Constant):
                            found[name] = node.value.value
    return found


def rerun_command(stem: str, seed: int, out: Path | None = None) -> str:
    return f"python -m apt_course run {stem[:4]} --seed {seed}" + (f" --out {out}" if out else "")


def check_executed(nb, path: Path, seed: int) -> None:
    """Refuse a copy that was not executed to the end, or whose run raised, naming the command that reruns it."""
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    rerun = rerun_command(path.stem, seed, path.parent)
    if errors:
        raise SiteError(f"{path}: the run failed ({errors[0].get('ename')}: {errors[0].get('evalue')}); fix it and "
                        f"rerun `{rerun}`")
    if any(c.get("execution_count") is None and c.source.strip() for c in code):
        raise SiteError(f"{path} was not executed to the end (a code cell has no execution count); run `{rerun}`")


def execute(path: Path, seed: int, out_dir: Path, results: Path) -> Path:
    """Execute one notebook on the tiny profile at ``seed`` into ``out_dir``; its figures go to ``results``."""
    from apt_course.runner import execute_notebook

    env = {"APT_COURSE_RESULTS": str(results),  # the kernel inherits these: the build's figures stay its own,
           "MPLBACKEND": "module://matplotlib_inline.backend_inline"}  # and plots show inline (CI sets Agg)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        print(f"executing {path.name} (tiny, seed {seed}) ...", flush=True)
        seconds = execute_notebook(path, {"PROFILE": "tiny", "SEED": seed}, out_dir)
        print(f"  done in {seconds:.0f} s", flush=True)
    except Exception as e:  # nbclient's CellExecutionError carries the cell's exception as ename and evalue
        what = f"{e.ename}: {e.evalue}" if getattr(e, "ename", None) else f"{type(e).__name__}: {e}"
        raise SiteError(f"{path.name} failed to execute ({what}); rerun it alone to see the whole "
                        f"traceback in runs/{path.name}: `{rerun_command(path.stem, seed)}`") from e
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out_dir / path.name


def readme_rows(readme: Path = README) -> dict[str, dict]:
    """The README's results table: ``{stem: {"teaches", "measured", "seeds"}}`` (empty if there is none)."""
    text = readme.read_text() if readme.exists() else ""
    return {m[2]: {"teaches": m[3].replace("`", ""), "measured": m[4].replace("`", ""), "seeds": m[5]}
            for m in ROW.finditer(text)}


def recorded_figures(results: Path | None, stem: str) -> str:
    """``name=value`` for each metric ``results/<stem>.json`` holds (4 significant digits), or an empty string."""
    path = results / f"{stem}.json" if results else None
    if path is None or not path.exists():
        return ""
    metrics = json.loads(path.read_text()).get("metrics", {})
    return ", ".join(f"{k} = {v:.4g}" for k, v in metrics.items())


def nav_html(prev: tuple[str, str] | None, nxt: tuple[str, str] | None) -> str:
    """Links to the previous chapter, the index and the next chapter: ``(file, title)`` pairs."""
    def link(item, arrow_left):
        if item is None:
            return "<span></span>"
        text = f"&larr; {html.escape(item[1])}" if arrow_left else f"{html.escape(item[1])} &rarr;"
        return f'<a href="{item[0]}">{text}</a>'

    return (f'<nav class="apt-nav">{link(prev, True)}<a href="index.html">All chapters</a>'
            f"{link(nxt, False)}</nav>")


def render_page(nb, title: str, site: dict, mathjax_url: str | None) -> str:
    """One notebook as a self-contained HTML page (nbconvert's lab template, the site's navigation added)."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    nb = nbformat.from_dict(nb)
    nb.metadata["title"] = f"{title} — APT Course"
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = BADGE.sub(r"[Open in Colab](\1)", cell.source)
    exporter = HTMLExporter(template_name="lab", template_file="apt_site.html.j2",
                            extra_loaders=[DictLoader({"apt_site.html.j2": TEMPLATE})])
    if mathjax_url:
        exporter.mathjax_url = mathjax_url
    body, _ = exporter.from_notebook_node(nb, resources={"site": site})
    return body


def render_index(chapters: list[dict], note: str) -> str:
    """The site's front page: a row per chapter with its title, what it teaches and its measured figures."""
    rows = []
    for c in chapters:
        rows.append(
            f'<tr><td><a href="{c["page"]}">{html.escape(c["title"])}</a></td>'
            f'<td>{html.escape(c["teaches"])}</td><td>{html.escape(c["measured"])}</td>'
            f'<td class="fig">{html.escape(c["figures"]) or "&mdash;"}</td></tr>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>APT Course — every chapter executed</title>
<style>
body {{ font-family: sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; line-height: 1.4; }}
table {{ border-collapse: collapse; font-size: 14px; }}
td, th {{ border: 1px solid #ccc; padding: 0.4em 0.6em; vertical-align: top; text-align: left; }}
td.fig {{ font-family: monospace; font-size: 12px; }}
</style></head>
<body>
<h1>APT Course — LLM post-training from the ground up</h1>
<p>Every chapter as it ran: code, plots, tables, sample generations and the exercise checkers' feedback.
{html.escape(note)}</p>
<table>
<tr><th>chapter</th><th>teaches</th><th>measured over the seeds swept (README)</th><th>this run's recorded figures</th></tr>
{chr(10).join(rows)}
</table>
</body></html>
"""


def replace_dir(staging: Path, out: Path) -> None:
    """Put ``staging`` at ``out``: the old site is moved aside first and removed only once the new one is there."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old)


def build_site(out: str | Path = "site", chapters: list[str] | None = None, from_runs: str | Path | None = None,
               seed: int = 0, results: str | Path | None = None, mathjax_url: str | None = None) -> Path:
    """Execute (or take from ``from_runs``) each chapter, write its page and the index to ``out``; returns ``out``."""
    from apt_course.runner import find_notebooks

    try:
        notebooks = sorted(set(find_notebooks(chapters)))
    except ValueError as e:
        raise SiteError(f"--chapters: {e}") from None
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0o700 would follow the site into place and hide it from a web server
    try:
        executed = staging / "notebooks"
        if from_runs is None:
            results = staging / "results"
        elif results is None and (Path(from_runs) / "results").is_dir():
            results = Path(from_runs) / "results"
        chapters_info = []
        for path in notebooks:
            if from_runs is None:
                copy = execute(path, seed, executed, Path(results))
            else:
                copy = Path(from_runs) / path.name
                if not copy.exists():
                    raise SiteError(f"{copy} does not exist: run `{rerun_command(path.stem, seed, Path(from_runs))}`"
                                    f" first, or build without --from-runs to execute it")
            nb = nbformat.read(copy, as_version=4)
            check_executed(nb, copy, seed)
            if from_runs is not None:
                executed.mkdir(exist_ok=True)
                shutil.copyfile(copy, executed / path.name)
            chapters_info.append({"stem": path.stem, "nb": nb, "title": chapter_title(nb),
                                  "page": f"{path.stem}.html", "params": run_parameters(nb)})
        table = readme_rows()
        for i, c in enumerate(chapters_info):
            prev = chapters_info[i - 1] if i > 0 else None
            nxt = chapters_info[i + 1] if i + 1 < len(chapters_info) else None
            nav = nav_html(prev and (prev["page"], prev["title"]), nxt and (nxt["page"], nxt["title"]))
            params = ", ".join(f"{k} = {v!r}" for k, v in sorted(c["params"].items()))
            run = (f'Executed with {html.escape(params)}. '
                   f'<a href="notebooks/{c["stem"]}.ipynb">The executed notebook</a>.')
            page = render_page(c["nb"], c["title"], {"nav": nav, "run": run}, mathjax_url)
            (staging / c["page"]).write_text(page, encoding="utf-8")
            row = table.get(c["stem"], {})
            c.update(teaches=row.get("teaches", ""), measured=row.get("measured", ""),
                     figures=recorded_figures(Path(results) if results else None, c["stem"]))
        source = f"the executed copies in {from_runs}" if from_runs else f"a run of the tiny profile at seed {seed}"
        (staging / "index.html").write_text(render_index(chapters_info, f"Built from {source}."), encoding="utf-8")
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(f"site: {out / 'index.html'} ({len(chapters_info)} chapters)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "site"), help="the site's folder (default: site/ of the checkout)")
    parser.add_argument("--chapters", nargs="*", default=None, help="notebook name prefixes, e.g. ch00 ch01 "
                        "(default: all)")
    parser.add_argument("--from-runs", default=None, help="a folder of executed copies (`python -m apt_course run "
                        "--seed 0 --out DIR`) to convert instead of executing")
    parser.add_argument("--seed", type=int, default=0, help="SEED for the run (default 0)")
    parser.add_argument("--results", default=None, help="with --from-runs: the results/ folder of that run "
                        "(default: DIR/results if it exists)")
    parser.add_argument("--mathjax-url", default=None, help="MathJax 2 to load instead of nbconvert's CDN copy")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # the checkout's package, installed or not
    try:
        build_site(args.out, args.chapters, args.from_runs, args.seed, args.results, args.mathjax_url)
    except SiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
