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


def write_tables(results: dict, recipe, outdir: Path, name: str) -> str:
    """Write ``<name>.json`` and the per-seed table ``<name>.md``; returns the table."""
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / f"{name}.json").write_text(json.dumps(results, indent=1))
    lines = ["# Chapter 11 loyalty sweep (tiny profile, `benchmarks/loyalty_sweep.py`)", "",
             f"Recipe: {recipe}", "",
             "acc = held-out general task accuracy (bare answer, no system message); acc_base = the shipped SFT model's;",
             "hardened = the fixed-GRPO model after the adversarial SFT; attack spoof = spoof rate on ~200 further",
             "held-out spoof attempts.",
             "", "| seed | method | " + " | ".join(COLS) + " | attack spoof | acc_base | seconds |",
             "|" + "---|" * (len(COLS) + 5)]
    for seed, r in results.items():
        for method in ("start", "naive", "fixed", "dpo", "hardened"):
            attack = f"{r['attacks'][method]['all']:.3f}" if method in r["attacks"] else ""
            lines.append(f"| {seed} | {method} | " + " | ".join(f"{r[method][c]:.3f}" for c in COLS)
                         + f" | {attack} | {r['acc_base']:.3f} | {r['seconds']:.0f} |")
    (outdir / f"{name}.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", default="loyalty_sweep")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="override TinyRecipe fields, e.g. --set harden_steps=80 harden_lr=2e-3")
    args = ap.parse_args(argv)

    import dataclasses

    from apt_course import loyalty
    from apt_course.profiles import load_model
    from apt_course.utils import setup_notebook

    defaults = loyalty.TinyRecipe()
    overrides = {k: type(getattr(defaults, k))(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    recipe = dataclasses.replace(defaults, **overrides)
    results = {}
    for seed in args.seeds:
        setup_notebook(seed)
        start = time.perf_counter()
        model, tok = load_model("tiny", "sft")
        out = loyalty.run_tiny(model, tok, seed, recipe)
        results[seed] = {k: out[k] for k in ("acc_base", "start", "naive", "fixed", "dpo", "hardened", "attacks")} | {
            "gap_curve": {k: out["histories"][k]["gap"] for k in ("naive", "fixed")},
            "seconds": time.perf_counter() - start}
        print(seed, json.dumps(results[seed]), flush=True)
    print(write_tables(results, recipe, Path(args.out), args.name))


if __name__ == "__main__":
    main()
