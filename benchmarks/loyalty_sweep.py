"""Chapter 11's experiment at several seeds: the loyalty gap, spoof rate and general accuracy per method.

Runs :func:`apt_course.loyalty.run_tiny` (the notebook's protocol: channel SFT, then naive-bonus GRPO,
fixed-bonus GRPO and DPO from the same start) for each seed and writes ``<name>.json`` and ``<name>.md``
to ``--out`` (default ``benchmarks/results``).

    python benchmarks/loyalty_sweep.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COLS = ("owner_style_owner", "owner_style_public", "gap", "spoof_rate", "task_acc", "acc")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="loyalty_sweep")
    args = ap.parse_args(argv)

    from apt_course import loyalty
    from apt_course.profiles import load_model
    from apt_course.utils import setup_notebook

    results = {}
    for seed in args.seeds:
        setup_notebook(seed)
        start = time.perf_counter()
        model, tok = load_model("tiny", "sft")
        out = loyalty.run_tiny(model, tok, seed)
        results[seed] = {k: out[k] for k in ("acc_base", "start", "naive", "fixed", "dpo")} | {
            "gap_curve": {k: out["histories"][k]["gap"] for k in ("naive", "fixed")},
            "seconds": time.perf_counter() - start}
        print(seed, json.dumps(results[seed]), flush=True)
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"{args.name}.json").write_text(json.dumps(results, indent=1))
    lines = ["# Chapter 11 loyalty sweep (tiny profile, `benchmarks/loyalty_sweep.py`)", "",
             "acc = held-out general task accuracy (bare answer, no system message); acc_base = the shipped SFT model's.",
             "", "| seed | method | " + " | ".join(COLS) + " | acc_base |", "|" + "---|" * (len(COLS) + 3)]
    for seed, r in results.items():
        for method in ("start", "naive", "fixed", "dpo"):
            lines.append(f"| {seed} | {method} | " + " | ".join(f"{r[method][c]:.3f}" for c in COLS)
                         + f" | {r['acc_base']:.3f} |")
    (outdir / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
