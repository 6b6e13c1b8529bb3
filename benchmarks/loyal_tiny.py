"""Chapter 11's offline channel (the shipped tiny ``loyal`` checkpoint) at many evaluation seeds, and its recipe
rebuilt at other training seeds.

    python benchmarks/loyal_tiny.py                                  # the shipped checkpoint, eval seeds 0-9
    python benchmarks/loyal_tiny.py --eval-seeds 0 1 2 --train-seeds 1 2 -j 2   # the recipe at training seeds 1, 2

Each evaluation seed draws its own test requests, held-out-family and fresh-family attacks (20 per form) and
general tasks (:func:`apt_course.loyalty_noise.measure`, as the notebook measures); general accuracy is compared
with the shipped ``sft`` model's on the same tasks. Writes ``benchmarks/results/loyal_tiny.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"


def run(train_seed: int | None, eval_seeds: list[int]) -> list[dict]:
    import torch

    from apt_course.checkpoints import load_checkpoint
    from apt_course.loyalty_noise import measure
    from apt_course.recipes import train_loyal_model

    torch.set_num_threads(1)
    start = time.perf_counter()
    if train_seed is None:
        model, tok = load_checkpoint("loyal")
    else:
        model, tok, _ = train_loyal_model({"seed": train_seed})
    seconds = time.perf_counter() - start
    sft, _ = load_checkpoint("sft")
    rows = []
    for s in eval_seeds:
        m, base = measure(model, tok, s), measure(sft, tok, s)
        rows.append({"train_seed": "shipped" if train_seed is None else train_seed, "eval_seed": s, "gap": m["gap"],
                     "spoof_rate": m["spoof_rate"], "heldout": m["heldout"]["all"], "fresh": m["fresh"]["all"],
                     "acc": m["acc"], "acc_sft": base["acc"], "heldout_forms": m["heldout"],
                     "fresh_forms": m["fresh"], "train_seconds": round(seconds, 1)})
        print(f"train {rows[-1]['train_seed']} eval {s}: gap {m['gap']:.2f} test spoof {m['spoof_rate']:.3f} "
              f"held-out {m['heldout']['all']:.4f} fresh {m['fresh']['all']:.4f} accuracy {base['acc']:.2f} -> "
              f"{m['acc']:.2f}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| training seed | eval seed | gap | spoof rate, test set | held-out family | fresh family | "
             "general accuracy: sft → loyal | worst forms (held-out; fresh) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        worst = []
        for fam in ("heldout_forms", "fresh_forms"):
            bad = sorted(((v, k) for k, v in r[fam].items() if k != "all" and v > 0), reverse=True)[:2]
            worst.append(", ".join(f"{k} {v:.2f}" for v, k in bad) or "none")
        lines.append(f"| {r['train_seed']} | {r['eval_seed']} | {r['gap']:.2f} | {r['spoof_rate']:.3f} | "
                     f"{r['heldout']:.4f} | {r['fresh']:.4f} | {r['acc_sft']:.2f} → {r['acc']:.2f} "
                     f"({100 * (r['acc'] - r['acc_sft']):+.0f} points) | {worst[0]}; {worst[1]} |")
    keys = ("gap", "spoof_rate", "heldout", "fresh")
    lines.append("")
    lines.append("Over every row: " + ", ".join(f"{k} {min(r[k] for r in rows):.4g}–{max(r[k] for r in rows):.4g}"
                                                for k in keys)
                 + f", accuracy change {min(r['acc'] - r['acc_sft'] for r in rows):+.3f} to "
                   f"{max(r['acc'] - r['acc_sft'] for r in rows):+.3f}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-seeds", type=int, nargs="+", default=list(range(10)))
    ap.add_argument("--train-seeds", type=int, nargs="*", default=[],
                    help="rebuild the recipe at these training seeds (about 4 minutes each) instead of loading")
    ap.add_argument("-j", "--jobs", type=int, default=1)
    args = ap.parse_args()
    jobs = [None] if not args.train_seeds else args.train_seeds
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = [r for part in pool.map(run, jobs, [args.eval_seeds] * len(jobs)) for r in part]
    OUT.mkdir(exist_ok=True)
    name = "loyal_tiny" if not args.train_seeds else "loyal_tiny_train_seeds"
    if args.train_seeds and (OUT / f"{name}.json").exists():  # other training seeds run before stay
        rows = [r for r in json.loads((OUT / f"{name}.json").read_text())
                if r["train_seed"] not in args.train_seeds] + rows
        rows.sort(key=lambda r: (str(r["train_seed"]), r["eval_seed"]))
    (OUT / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (OUT / f"{name}.md").write_text(
        "# The tiny `loyal` checkpoint at many seeds\n\nWritten by `python benchmarks/loyal_tiny.py "
        + " ".join(f"{k} {' '.join(map(str, v))}" for k, v in
                   (("--eval-seeds", args.eval_seeds), ("--train-seeds", args.train_seeds)) if v)
        + "` (training seeds run earlier are kept; one thread per process; 100 test requests, 20 per attack "
          "form, 100 general tasks per eval seed).\n\n"
        + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
