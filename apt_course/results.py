"""Recording each chapter's measured figures and printing them as one table.

A notebook makes a :class:`ResultsRecorder` in its first cell and calls :meth:`save` at the end; the
file ``results/<chapter>.json`` holds ``{"chapter", "metrics": {name: number}, "seconds"}``.
``python -m apt_course report`` prints every recorded chapter.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

from .utils import repo_root, write_atomic


def results_dir() -> Path:
    """``$APT_COURSE_RESULTS``, else ``results/`` in the course checkout, else ``./results``."""
    if os.environ.get("APT_COURSE_RESULTS"):
        return Path(os.environ["APT_COURSE_RESULTS"])
    root = repo_root()
    return (root / "results") if root else Path("results")


class ResultsRecorder:
    """Times a chapter from creation and writes its metrics to ``results/<chapter>.json`` (a run on another
    profile than ``tiny`` to ``results/<chapter>.<profile>.json``, so it never overwrites the tiny figures)."""

    def __init__(self, chapter: str, directory: str | Path | None = None, profile: str | None = None):
        if not chapter or any(c in chapter for c in "/\\ "):
            raise ValueError(f"chapter name {chapter!r} must be a non-empty file stem like 'ch00_tiny_world'")
        self.chapter = chapter
        self.profile = profile
        self.directory = Path(directory) if directory else results_dir()
        self.start = time.perf_counter()
        self.metrics: dict[str, float] = {}

    def log(self, **metrics: float) -> None:
        """Add metrics (numbers only; NaN is refused so a broken run cannot look recorded)."""
        for name, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TypeError(f"metric {name!r} must be a number, got {value!r}") from None
            if math.isnan(value):
                raise ValueError(f"metric {name!r} is NaN: the measurement failed, look at the cells above")
            self.metrics[name] = value

    def save(self, **metrics: float) -> Path:
        self.log(**metrics)
        record = {
            "chapter": self.chapter,
            "metrics": self.metrics,
            "seconds": round(time.perf_counter() - self.start, 2),
        }
        stem = self.chapter
        if self.profile not in (None, "tiny"):
            record["profile"] = self.profile
            stem += f".{self.profile}"
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{stem}.json"
        write_atomic(path, json.dumps(record, indent=2) + "\n")  # a reader never sees half a record
        print(f"recorded {len(self.metrics)} metrics in {record['seconds']} s -> {path}")
        return path


def load_results(directory: str | Path | None = None) -> list[dict]:
    directory = Path(directory) if directory else results_dir()
    records = []
    for path in sorted(directory.glob("*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            print(f"skipping {path}: not valid JSON ({e})")
    return records


def format_report(records: list[dict]) -> str:
    """One table: a row per chapter, its seconds and its metrics."""
    if not records:
        return "no results recorded yet: run a notebook (results go to results/<chapter>.json)"
    rows = [("chapter", "seconds", "metrics")]
    for r in records:
        metrics = "  ".join(f"{k}={v:.4g}" for k, v in r.get("metrics", {}).items())
        name = r.get("chapter", "?") + (f" [{r['profile']}]" if r.get("profile") else "")
        rows.append((name, f"{r.get('seconds', float('nan')):.1f}", metrics))
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def sweep_rows(chapter: str, profile: str = "tiny", path: str | Path | None = None) -> list[dict]:
    """The successful runs of ``chapter`` in the recorded seed sweep (``benchmarks/results/seed_sweep.json``, or
    ``<profile>_sweep.json``), each ``{"chapter", "seed", "seconds", "status", "metrics"}``; no sweep file (an
    installed package, no checkout) gives ``[]``."""
    if path is None:
        root = repo_root()
        if root is None:
            return []
        path = root / "benchmarks" / "results" / ("seed_sweep.json" if profile == "tiny" else f"{profile}_sweep.json")
    path = Path(path)
    if not path.exists():
        return []
    return [r for r in json.loads(path.read_text()) if r.get("chapter") == chapter and r.get("status") == "ok"]


def sweep_ranges(chapter: str, metrics, profile: str = "tiny", path: str | Path | None = None) -> dict:
    """``{metric: (min, max, seeds)}`` over :func:`sweep_rows`: what every seed reached, for prose that quotes the
    sweep. A metric the sweep did not record is left out; no sweep file gives ``{}``."""
    rows = sweep_rows(chapter, profile, path)
    ranges = {}
    for name in metrics:
        values = [r["metrics"][name] for r in rows if name in r.get("metrics", {})]
        if values:
            ranges[name] = (min(values), max(values), sorted(r["seed"] for r in rows if name in r["metrics"]))
    return ranges


# A figure within float rounding of its bound meets it: 0.49 - 0.29 is 0.19999999999999996, and a gain of exactly
# 0.20 passes ">= 0.20" as the plain ``acc_after >= acc_before + 0.20`` it replaced did.
_EPS = 1e-9
_COMPARE = {">=": lambda v, b: v >= b - _EPS, "<=": lambda v, b: v <= b + _EPS, "==": lambda v, b: v == b,
            ">": lambda v, b: v > b, "<": lambda v, b: v < b}


def check_floors(checks: dict[str, tuple], source: str = "FINDINGS.md") -> str:
    """A notebook's floors in one call: ``checks`` maps a label to ``(measured, op, bound)``, op one of
    ``>= <= == > <``. Prints one line per check (value, bound, ``ok`` or ``FAILED``) and returns ``""`` when
    every check holds, else one message naming every check that failed and where the bounds come from
    (``source``). The notebook asserts it: ``failed = check_floors(...)``, then ``assert not failed, failed``."""
    bad = [op for _, op, _ in checks.values() if op not in _COMPARE]
    if bad:
        raise ValueError(f"unknown comparison {bad[0]!r}: use one of {sorted(_COMPARE)}")
    width = max((len(label) for label in checks), default=0)
    failed = []
    for label, (value, op, bound) in checks.items():
        ok = _COMPARE[op](value, bound)
        print(f"  {label:{width}}  {value:9.4g}  {op:>2} {bound:<8g} {'ok' if ok else 'FAILED'}")
        if not ok:
            failed.append(f"{label}: {value:.4g}, wanted {op} {bound:g}")
    if not failed:
        return ""
    return (f"{len(failed)} of {len(checks)} checks failed ({'; '.join(failed)}); the bounds and the seeds they come "
            f"from: {source}")


# ---------------------------------------------------------------- seed-paired differences

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (bisection on its CDF, the density
    ``Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) · (1 + x²/ν)^(-(ν+1)/2)`` integrated by Simpson's rule): no scipy needed."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def cdf(x: float, n: int = 2000) -> float:
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < q else (lo, mid)
    return (lo + hi) / 2


def interval_verdict(low: float, high: float) -> str:
    """What an interval on a difference says: ``"better"`` (above 0), ``"worse"`` (below 0), else ``"no difference
    detected"``."""
    return "better" if low > 0 else "worse" if high < 0 else "no difference detected"


def interval(diffs: list[float], comparisons: int = 1) -> tuple[float, float, float]:
    """Mean of seed-paired differences and its 95 % t-interval, ``m ± t(1 - 0.025/k, n-1) · sd / √n``, with
    ``k = comparisons`` (Bonferroni: k intervals hold together with 95 % probability)."""
    m, sd = mean_std(diffs)
    if len(diffs) < 2:
        return m, float("-inf"), float("inf")
    half = t_quantile(1 - 0.025 / comparisons, len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return m, m - half, m + half
