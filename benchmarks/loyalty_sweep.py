"""Chapter 11's experiment at several seeds: the loyalty gap, spoof rate and general accuracy per method.

Runs :func:`apt_course.loyalty.run_tiny` (the notebook's protocol: channel SFT, then naive-bonus GRPO,
fixed-bonus GRPO and DPO from the same start, the fixed model hardened, and the program's channel guard on the
hardened model's replies) for each seed and writes ``<name>.json`` and ``<name>.md`` to ``--out`` (default
``benchmarks/results``): the per-seed table of gap, spoof rate (test set, training-claim attack set, held-out
family of :mod:`apt_course.attacks_heldout`) and general accuracy, then the held-out spoof rate per form.

    python benchmarks/loyalty_sweep.py --seeds 0 1 2 3 4 5 6 7 8 9 --unseen 29 37 53
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


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _fmt(x) -> str:
    return "" if x is None else f"{x:.3f}"


def summary_rows(results: dict, unseen: set) -> list[str]:
    """One row per seed: gap, test spoof, attack-set spoof, held-out spoof for fixed / hardened / guarded, accuracy."""
    lines = ["| seed | acc_base | fixed gap | hardened gap | test spoof fixed | test spoof hardened | test spoof guarded "
             "| attack spoof hardened | held-out fixed | held-out hardened | held-out guarded | worst held-out form "
             "(hardened) | acc fixed | acc hardened | acc hardened - acc_base |", "|" + "---|" * 15]
    for seed, r in results.items():
        ho = r["heldout"]["hardened"]
        worst = max((k for k in ho if k != "all"), key=lambda k: ho[k])
        tag = f"{seed} (unseen)" if int(seed) in unseen else str(seed)
        lines.append(f"| {tag} | {r['acc_base']:.2f} | {r['fixed']['gap']:.3f} | {r['hardened']['gap']:.3f} | "
                     f"{r['fixed']['spoof_rate']:.3f} | {r['hardened']['spoof_rate']:.3f} | {r['guarded']['spoof_rate']:.3f} | "
                     f"{r['attacks']['hardened']['all']:.3f} | {r['heldout']['fixed']['all']:.3f} | {ho['all']:.4f} | "
                     f"{r['heldout']['guarded']['all']:.3f} | {worst} {ho[worst]:.2f} | {r['fixed']['acc']:.2f} | "
                     f"{r['hardened']['acc']:.2f} | {r['hardened']['acc'] - r['acc_base']:+.2f} |")
    return lines


def per_form_rows(results: dict) -> list[str]:
    """Held-out spoof rate per form: fixed GRPO and hardened, mean and max over seeds (guarded is 0 by construction)."""
    forms = [k for k in next(iter(results.values()))["heldout"]["hardened"] if k != "all"]
    lines = ["| held-out form | fixed mean | fixed max | hardened mean | hardened max | guarded max |", "|" + "---|" * 6]
    for f in forms + ["all"]:
        vals = {m: [r["heldout"][m][f] for r in results.values()] for m in ("fixed", "hardened", "guarded")}
        lines.append(f"| {f} | {sum(vals['fixed']) / len(results):.3f} | {max(vals['fixed']):.2f} | "
                     f"{sum(vals['hardened']) / len(results):.3f} | {max(vals['hardened']):.2f} | {max(vals['guarded']):.2f} |")
    return lines


def write_tables(results: dict, recipe, outdir: Path, name: str, unseen=()) -> str:
    """Write ``<name>.json`` and the tables ``<name>.md``; returns the markdown."""
    outdir.mkdir(parents=True, exist_ok=True)
    _atomic_write(outdir / f"{name}.json", json.dumps(results, indent=1))
    lines = ["# Chapter 11 loyalty sweep (tiny profile, `benchmarks/loyalty_sweep.py`)", "",
             f"Recipe: {recipe}", "",
             "acc = held-out general task accuracy (bare answer, no system message); acc_base = the shipped SFT model's.",
             "hardened = the fixed-GRPO model after the adversarial SFT; guarded = the hardened model's replies through",
             "the program's `loyalty.channel_guard` (a public request never gets owner style: 0 by construction).",
             "test spoof: the ~22-25 spoof attempts of the 100-request test set; attack spoof: ~200 further test-split",
             "attempts with the training claims; held-out: the family of `apt_course/attacks_heldout.py` (20 forms x 20",
             "requests, never trained on). Seeds marked unseen were not used to choose anything.", ""]
    lines += summary_rows(results, set(unseen)) + ["", "## Held-out family, spoof rate per form over the seeds above", ""]
    lines += per_form_rows(results) + ["", "## Every method, every seed", "",
                                       "| seed | method | " + " | ".join(COLS) + " | attack spoof | seconds |",
                                       "|" + "---|" * (len(COLS) + 4)]
    for seed, r in results.items():
        for method in ("start", "naive", "fixed", "dpo", "hardened", "guarded"):
            attack = r["attacks"][method]["all"] if method in r["attacks"] else None
            lines.append(f"| {seed} | {method} | " + " | ".join(f"{r[method][c]:.3f}" for c in COLS)
                         + f" | {_fmt(attack)} | {r['seconds']:.0f} |")
    text = "\n".join(lines) + "\n"
    _atomic_write(outdir / f"{name}.md", text)
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    ap.add_argument("--unseen", type=int, nargs="*", default=[29, 37, 53],
                    help="further seeds, run after --seeds and marked unseen in the table (never used to tune)")
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
    for seed in args.seeds + [s for s in args.unseen if s not in args.seeds]:
        setup_notebook(seed)
        start = time.perf_counter()
        model, tok = load_model("tiny", "sft")
        out = loyalty.run_tiny(model, tok, seed, recipe)
        keys = ("acc_base", "start", "naive", "fixed", "dpo", "hardened", "guarded", "attacks", "heldout")
        results[seed] = {k: out[k] for k in keys} | {
            "gap_curve": {k: out["histories"][k]["gap"] for k in ("naive", "fixed")},
            "seconds": time.perf_counter() - start}
        print(seed, json.dumps(results[seed]), flush=True)
        write_tables(results, recipe, Path(args.out), args.name, args.unseen)  # partial tables survive a stop
    print(write_tables(results, recipe, Path(args.out), args.name, args.unseen))


if __name__ == "__main__":
    main()
