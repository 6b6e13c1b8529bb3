"""Execute every notebook (or those named) and print its wall time.

    python benchmarks/notebook_times.py            # all notebooks, seed 0
    python benchmarks/notebook_times.py ch04 ch07 --seeds 0 1 2

Targets: each notebook <= 60 s on a 2-core CPU (hard limit 90 s); the whole CI run < 20 minutes.
"""

import argparse
import os
import sys

from apt_course.results import load_results
from apt_course.runner import execute_notebook, find_notebooks, repo_root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    args = parser.parse_args()
    os.environ.setdefault("APT_COURSE_QUIET", "1")
    rows = []
    for path in find_notebooks(args.chapters):
        for seed in args.seeds:
            try:
                seconds = execute_notebook(path, {"SEED": seed}, repo_root() / "runs" / f"seed{seed}")
                status = "ok"
            except Exception as e:  # keep timing the others; report the failure
                seconds, status = float("nan"), f"FAILED: {type(e).__name__}"
            metrics = next((r["metrics"] for r in load_results() if r["chapter"] == path.stem), {})
            rows.append((path.stem, seed, seconds, status, metrics))
            shown = "  ".join(f"{k}={v:.3g}" for k, v in metrics.items())
            print(f"{path.stem:<24} seed {seed}  {seconds:6.1f} s  {status}  {shown}", flush=True)
    total = sum(r[2] for r in rows if r[3] == "ok")
    print(f"total {total:.0f} s over {len(rows)} runs; slowest: "
          + ", ".join(f"{r[0]} {r[2]:.0f}s" for r in sorted(rows, key=lambda r: -(r[2] == r[2] and r[2]))[:3]))
    return 0 if all(r[3] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
