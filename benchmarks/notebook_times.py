"""Where the time goes: execute notebooks and print each one's wall time, split into kernel start, the setup
cell (imports), and its slowest cells.

    python benchmarks/notebook_times.py                  # every notebook, seed 0, one at a time
    python benchmarks/notebook_times.py ch04 ch07 --seeds 0 1 2 --top 5
    python benchmarks/notebook_times.py --markdown benchmarks/results/notebook_times.md --readme
    python benchmarks/notebook_times.py --profile smol --threads 1 --readme   # the real SmolLM2 chapters, one thread
    python benchmarks/notebook_times.py --profile smol --threads 2 --readme   # ... and with both cores

Run it with nothing else on the machine: timings on a shared 2-core CPU are worth nothing. Targets: every
notebook <= 90 s on a 2-core CPU (the course's rule), all of them < 12 minutes one after another; every chapter on
the ``smol`` profile (the real SmolLM2) <= 3 minutes alone, 5 at most. ``--profile smol`` runs only the chapters
that run there (those whose notebook sets ``SMOL``) and writes README's smol table (``<!-- smol-times:... -->``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from apt_course.results import load_results
from apt_course.runner import find_notebooks, inject_parameters


def cell_seconds(cell) -> float:
    """Execution time of one executed cell, from the timestamps nbclient records in its metadata."""
    timing = cell.get("metadata", {}).get("execution", {})
    start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
    if not start or not end:
        return 0.0
    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def time_notebook(path: Path, parameters: dict) -> dict:
    """Execute ``path``; returns total, kernel start, per-cell seconds and the first line of each cell."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, parameters)
    client = NotebookClient(nb, timeout=1200, kernel_name="python3", record_timing=True,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    with client.setup_kernel():
        started = time.perf_counter()
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index)
    total = time.perf_counter() - start
    cells = [(cell_seconds(c), (c.source.strip().splitlines() or [""])[0][:60]) for c in nb.cells
             if c.cell_type == "code"]
    return {"total": total, "kernel": started - start, "cells": cells}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--top", type=int, default=3, help="slowest cells to show per notebook")
    parser.add_argument("--profile", default="tiny", help="tiny (default) or smol")
    parser.add_argument("--threads", type=int, default=0,
                        help="pin torch's CPU threads in the kernels (APT_COURSE_THREADS); 0 = the profile's own")
    parser.add_argument("--markdown", default=None, help="also write the table to this file")
    parser.add_argument("--readme", action="store_true",
                        help="also put the table in MAINTAINING.md (tiny, between <!-- times:start --> and <!-- times:end -->) "
                             "or README.md (smol: <!-- smol-times:... -->)")
    args = parser.parse_args()
    os.environ.setdefault("APT_COURSE_QUIET", "1")
    if args.threads:
        os.environ["APT_COURSE_THREADS"] = str(args.threads)
    lines = ["| notebook | seed | total s | kernel start s | setup cell s | slowest cells (s) |", "|---|---|---|---|---|---|"]
    totals, ok = [], True
    paths = find_notebooks(args.chapters or None)
    if args.profile != "tiny":
        paths = [p for p in paths if "SMOL" in p.read_text()]
    for path in paths:
        for seed in args.seeds:
            try:
                t = time_notebook(path, {"SEED": seed, "PROFILE": args.profile})
            except Exception as e:  # keep timing the others; report the failure
                print(f"{path.stem:<24} seed {seed}  FAILED: {type(e).__name__}: {str(e)[-300:]}", flush=True)
                ok = False
                continue
            setup = next((s for s, src in t["cells"] if src.startswith("try:")), 0.0)  # the install/import cell
            slow = sorted(t["cells"], key=lambda c: -c[0])[:args.top]
            shown = "; ".join(f"{s:.1f} `{src}`" for s, src in slow)
            totals.append(t["total"])
            metrics = next((r["metrics"] for r in load_results() if r["chapter"] == path.stem
                            and r.get("profile", "tiny") == args.profile), {})  # this profile's record
            print(f"{path.stem:<24} seed {seed}  {t['total']:6.1f} s (kernel {t['kernel']:.1f}, setup {setup:.1f})  "
                  f"slowest: {shown}", flush=True)
            print("    " + "  ".join(f"{k}={v:.3g}" for k, v in metrics.items()), flush=True)
            lines.append(f"| {path.stem} | {seed} | {t['total']:.1f} | {t['kernel']:.1f} | {setup:.1f} | "
                         f"{shown.replace('|', '/')} |")
    lines.append(f"| **all** | | **{sum(totals):.0f}** | | | |")
    if args.profile != "tiny":
        from apt_course.utils import cpu_bf16_supported

        lines.insert(0, f"{args.profile} profile, torch threads: {args.threads or 'all cores'} of {os.cpu_count()}, "
                        f"precision: {'bf16 autocast' if cpu_bf16_supported() else 'float32'}\n")
    print(f"total {sum(totals):.0f} s over {len(totals)} runs")
    if args.markdown:
        out = Path(args.markdown)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"Written by `python benchmarks/notebook_times.py` on {os.cpu_count()} CPUs.\n\n"
                       + "\n".join(lines) + "\n")
    if args.readme:
        if args.profile == "tiny":  # the maintainer's table (MAINTAINING.md); the smol one is the learner's (README)
            write_readme_table(lines, readme=Path(__file__).resolve().parent.parent / "MAINTAINING.md", marker="times")
        else:
            write_readme_table(lines, marker=f"{args.profile}-times")
    return 0 if ok else 1


def write_readme_table(lines: list[str], readme: Path = Path(__file__).resolve().parent.parent / "README.md",
                       marker: str = "times") -> None:
    """Replace the table between README's ``<!-- MARKER:start -->`` and ``<!-- MARKER:end -->`` (atomically)."""
    from apt_course.utils import write_atomic

    text = readme.read_text(encoding="utf-8")
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} markers: add them where the table goes")
    head, rest = text.split(start, 1)
    write_atomic(readme, head + start + "\n" + "\n".join(lines) + "\n" + end + rest.split(end, 1)[1])


if __name__ == "__main__":
    sys.exit(main())
