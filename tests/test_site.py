"""The static site (tools/build_site.py): chapters 00 and 01 executed on the tiny profile and converted once per
session, then checked as HTML (always) and in a real headless Chromium (when one is installed)."""

import base64
import html
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ["ch01", "ch02"]  # the two shortest chapters with plots
STEMS = ["ch01_mdp", "ch02_reinforce"]
CHROMIUM = os.environ.get("CHROMIUM") or next(
    (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
     if shutil.which(n)), None)

spec = importlib.util.spec_from_file_location("build_site", ROOT / "tools" / "build_site.py")
build_site = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build_site)


@pytest.fixture(scope="session")
def site(tmp_path_factory):
    """The site of chapters 00 and 01, built once even when xdist workers share the session (a file lock)."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return build_site.build_site(tmp_path_factory.getbasetemp() / "site", CHAPTERS)
    shared = tmp_path_factory.getbasetemp().parent  # the same folder for every worker of this session
    with FileLock(str(shared / "site.lock")):
        if not (shared / "site" / "index.html").exists():
            build_site.build_site(shared / "site", CHAPTERS)
    return shared / "site"


class Page(HTMLParser):
    """What the checks need from a page: its <title>, first <h1>, <img> sources and <a> targets."""

    def __init__(self, path: Path):
        super().__init__()
        self.title, self.h1, self.imgs, self.links = "", None, [], []
        self._in = None
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.imgs.append(attrs.get("src") or "")
        elif tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag in ("title", "h1") and (tag == "title" or self.h1 is None):
            self._in = tag
            if tag == "h1":
                self.h1 = ""

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "title":
            self.title += data
        elif self._in == "h1":
            self.h1 += data


def png_size(src: str) -> tuple[int, int]:
    """Width and height of a ``data:image/png;base64,`` PNG, read from its IHDR chunk (after the 8-byte magic)."""
    data = base64.b64decode(src.split(",", 1)[1])
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


def png_outputs(nb) -> int:
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_every_page_exists_with_its_title_figures_and_working_links(site):
    index = Page(site / "index.html")
    pages = [f"{s}.html" for s in STEMS]
    assert [link for link in index.links if link.startswith("ch")] == pages, "the index lists the chapters in order"
    text = (site / "index.html").read_text()
    assert "max_abs_diff = " in text and "return_trained_min = " in text, "the index shows this run's figures"
    assert "CartPole return after training" in text, "the index shows the README's measured ranges"
    for i, stem in enumerate(STEMS):
        nb = nbformat.read(site / "notebooks" / f"{stem}.ipynb", as_version=4)
        title = build_site.chapter_title(nb)
        page = Page(site / f"{stem}.html")
        assert page.title.startswith(title) and page.h1.startswith(title)
        assert build_site.run_parameters(nb) == {"PROFILE": "tiny", "SEED": 0}
        figures = [src for src in page.imgs if src.startswith("data:image/png;base64,")]
        assert len(figures) == png_outputs(nb) >= 1, f"{stem}: every plot of the run is on the page"
        assert all(min(png_size(src)) > 50 for src in figures), f"{stem}: a figure is not a real PNG"
        assert not [src for src in page.imgs if src not in figures], f"{stem}: an image is not embedded"
        local = [link.split("#")[0] for link in page.links if not re.match(r"(https?:|#|mailto:)", link)]
        assert all((site / link).exists() for link in local), f"{stem}: a link points nowhere: {local}"
        assert "index.html" in local and (i == 0 or pages[i - 1] in local) and (i + 1 == len(STEMS) or pages[i + 1]
                                                                              in local), f"{stem}: prev/next/index"


def test_from_runs_converts_executed_copies_without_running_them(site, tmp_path):
    out = build_site.build_site(tmp_path / "again", ["ch01"], from_runs=site / "notebooks")
    page = Page(out / "ch01_mdp.html")
    assert page.title == Page(site / "ch01_mdp.html").title and len(page.imgs) == len(Page(site / "ch01_mdp.html").imgs)
    assert "&mdash;" in (out / "index.html").read_text(), "no results folder given: no figures claimed"


def test_bad_input_names_the_chapter_and_the_command(tmp_path):
    out = tmp_path / "site"
    out.mkdir()
    (out / "keep.txt").write_text("the previous site")
    with pytest.raises(build_site.SiteError, match="no notebook matches 'ch99'"):
        build_site.build_site(out, ["ch99"])
    runs = tmp_path / "runs"
    runs.mkdir()
    with pytest.raises(build_site.SiteError, match=r"ch01_mdp.ipynb does not exist: run `python -m apt_course run ch01"):
        build_site.build_site(out, ["ch01"], from_runs=runs)
    shutil.copy(ROOT / "notebooks" / "ch01_mdp.ipynb", runs)  # committed copy: no outputs
    with pytest.raises(build_site.SiteError, match="was not executed to the end.*apt_course run ch01 --seed 0"):
        build_site.build_site(out, ["ch01"], from_runs=runs)
    nb = nbformat.read(runs / "ch01_mdp.ipynb", as_version=4)
    for n, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        cell.execution_count = n + 1
    nb.cells[-1].outputs = [nbformat.v4.new_output("error", ename="AssertionError", evalue="floor", traceback=[])]
    nb.cells[-1].cell_type = "code"
    nbformat.write(nb, runs / "ch01_mdp.ipynb")
    with pytest.raises(build_site.SiteError, match="the run failed \\(AssertionError: floor\\)"):
        build_site.build_site(out, ["ch01"], from_runs=runs)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], "no half-built site left behind"
    assert (out / "keep.txt").read_text() == "the previous site", "a failed build leaves the previous site whole"


def chromium(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium offline (every host name fails to resolve) with its profile in ``workdir``."""
    flags = ["--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--window-size=1280,2000",
             "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={workdir / 'chromium-profile'}"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def test_a_notebook_that_fails_is_named_with_the_command_that_reruns_it(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("SEED = 1", metadata={"tags": ["parameters"]}),
                                         nbformat.v4.new_code_cell("raise ValueError('the floor failed')")])
    nbformat.write(nb, tmp_path / "ch42_broken.ipynb")
    with pytest.raises(build_site.SiteError, match=r"ch42_broken.ipynb failed to execute \(ValueError: the floor "
                       r"failed\).*`python -m apt_course run ch42 --seed 3`"):
        build_site.execute(tmp_path / "ch42_broken.ipynb", 3, tmp_path / "out", tmp_path / "results")


def browser_report(page: Path, workdir: Path) -> dict:
    """Open a copy of ``page`` in Chromium with a script that writes, once the page has loaded, its title, first
    heading and each image's decoded and displayed size into the DOM, and read them back from ``--dump-dom``."""
    probe = """<script>window.addEventListener("load", () => {
      const imgs = Array.from(document.images).map(i => ({complete: i.complete, w: i.naturalWidth,
        h: i.naturalHeight, shown: i.getBoundingClientRect().width}));
      const h1 = document.querySelector("h1");
      const pre = document.createElement("pre"); pre.id = "apt-probe";
      pre.textContent = JSON.stringify({title: document.title, h1: h1 ? h1.textContent : null, imgs: imgs});
      document.body.appendChild(pre);});</script>"""
    copy = workdir / page.name
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", probe + "</body>"), encoding="utf-8")
    dom = chromium(workdir, "--virtual-time-budget=5000", "--dump-dom", copy.as_uri()).stdout
    found = re.search(r'<pre id="apt-probe">(.*?)</pre>', dom, re.S)
    assert found, f"{page.name} did not load in Chromium (no probe in its DOM)"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: `apt-get install -y chromium` (Debian; Ubuntu: "
                    "chromium-browser) or set CHROMIUM=/path/to/chrome")
def test_every_page_loads_and_every_figure_renders_in_chromium(site, tmp_path):
    index = browser_report(site / "index.html", tmp_path)
    assert index["title"].startswith("APT Course") and index["imgs"] == []
    for stem in STEMS:
        nb = nbformat.read(site / "notebooks" / f"{stem}.ipynb", as_version=4)
        report = browser_report(site / f"{stem}.html", tmp_path)
        assert report["h1"].startswith(build_site.chapter_title(nb)), f"{stem}: the page did not render its title"
        assert len(report["imgs"]) == png_outputs(nb), f"{stem}: {report['imgs']}"
        for img in report["imgs"]:  # decoded (natural size) and laid out on the page (displayed width)
            assert img["complete"] and img["w"] > 50 and img["h"] > 50 and img["shown"] > 50, f"{stem}: {img}"
    shot = tmp_path / "ch01.png"
    chromium(tmp_path, f"--screenshot={shot}", (site / "ch01_mdp.html").as_uri())
    assert png_size("x," + base64.b64encode(shot.read_bytes()).decode()) == (1280, 2000), "the screenshot"
