"""Chapter 12's experiment at several seeds: every condition's figures as mean ± std, and which claims held.

Runs :func:`apt_course.storm.run_study` (the notebook's protocol, from the shipped ``cot`` checkpoint, which
writes the chain of thought of 3-digit sums and gets nearly all of them right: part 1, answer-only vs
step-internalised vs token-internalised (Deng et al.) training at equal budget; part 2, the storm stage — no
noise, storm noise under each schedule and r0, NEFTune — at equal budget) for each seed, and writes
``<name>.json`` (every seed's figures) and ``<name>.md`` (the tables) to ``--out``. Each noise condition is
compared with no noise seed by seed: the mean paired difference and its 95 % t-interval decide the verdict.

    python benchmarks/storm_sweep.py --seeds 0 1 2 3 4              # the committed table
    python benchmarks/storm_sweep.py --seeds 0 1 2 --full-grid      # every schedule x r0
    python benchmarks/storm_sweep.py --seeds 0 1 2 --cot-steps 400 --name storm_sweep_long
    python benchmarks/storm_sweep.py --quick                        # a few seconds: CI checks the script runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METRICS = ("acc", "acc_sampled", "acc_swap", "acc_spaces", "tokens_per_answer", "train_seconds")
ROBUSTNESS = ("acc", "acc_sampled", "acc_swap", "acc_spaces")

from apt_course.results import interval, interval_verdict, mean_std  # noqa: E402  (after the sys.path line)


def fmt(values: list[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def summarise(runs: dict[int, dict]) -> dict:
    """``runs``: seed -> run_study's result. The start's figures, and per part and condition every metric's
    per-seed list."""
    seeds = sorted(runs)
    out = {"start": {m: [runs[s]["start"][m] for s in seeds] for m in METRICS if m != "train_seconds"}}
    for part in ("cot", "storm"):
        out[part] = {}
        for name in runs[seeds[0]][part]:
            out[part][name] = {m: [runs[s][part][name]["metrics"][m] for s in seeds] for m in METRICS}
    return out


def claims(summary: dict) -> dict:
    """What held at every seed (the notebook asserts only these), and each noise condition against no noise as
    seed-paired differences with a 95 % interval: "better" (the interval is above 0), "worse" (below 0) or
    "no difference detected"."""
    start, cot, storm = summary["start"], summary["cot"], summary["storm"]
    n = len(cot["answer_only"]["acc"])

    def every(a, b, metric="acc", cond=lambda x, y: x > y):
        return sum(cond(x, y) for x, y in zip(a[metric], b[metric]))

    result = {
        "seeds": n,
        "explicit_beats_answer_only": every(start, cot["answer_only"]),
        "internalised_steps_beats_answer_only": every(cot["internalised_steps"], cot["answer_only"]),
        "internalised_tokens_beats_answer_only": every(cot["internalised_tokens"], cot["answer_only"]),
        "internalised_fewer_tokens_than_explicit": min(
            every(cot[k], start, "tokens_per_answer", lambda x, y: x < y)
            for k in ("internalised_steps", "internalised_tokens")),
        "noise_vs_noise_free": {},
    }
    base = storm["noise_free"]
    k = (len(storm) - 1) * len(ROBUSTNESS)  # every noise condition against no noise, on every measure
    result["comparisons"] = k
    for name, figs in storm.items():
        if name == "noise_free":
            continue
        entry = {}
        for metric in ROBUSTNESS:
            diffs = [x - y for x, y in zip(figs[metric], base[metric])]
            m, low, high = interval(diffs)
            _, fam_low, fam_high = interval(diffs, k)
            entry[metric] = {"better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs),
                             "mean_diff": m, "std_diff": mean_std(diffs)[1], "low": low, "high": high,
                             "family_low": fam_low, "family_high": fam_high,
                             "verdict": interval_verdict(fam_low, fam_high)}
        result["noise_vs_noise_free"][name] = entry
    return result


def markdown(summary: dict, verdict: dict, seeds: list[int], study: dict, command: str, seconds: float) -> str:
    lines = [f"# Storm sweep: seeds {', '.join(map(str, seeds))}", "",
             f"Made by `{command}` in {seconds:.0f} s (torch threads: 1; timings on a shared 2-core CPU are "
             "inflated by other load). Every figure is on held-out sums; mean ± std over seeds (sample std).", "",
             "Study: " + ", ".join(f"{k}={v}" for k, v in study.items()), ""]
    header = "| condition | acc (greedy) | acc sampled T=1 | acc swapped operands | acc doubled spaces | " \
             "tokens/answer | train s | acc per seed |"
    st = summary["start"]
    lines += ["## The start: the `cot` checkpoint, writing its chain", "", header, "|" + "---|" * 8,
              f"| cot (explicit) | {fmt(st['acc'])} | {fmt(st['acc_sampled'])} | {fmt(st['acc_swap'])} | "
              f"{fmt(st['acc_spaces'])} | {fmt(st['tokens_per_answer'], 1)} | 0 | "
              + " / ".join(f"{v:.2f}" for v in st["acc"]) + " |", ""]
    for part, title in (("cot", "Part 1 - taking the written chain away (equal budget, from the cot checkpoint)"),
                        ("storm", "Part 2 - the storm stage (equal budget, from the cot checkpoint)")):
        lines += [f"## {title}", "", header, "|" + "---|" * 8]
        for name, figs in summary[part].items():
            per_seed = " / ".join(f"{v:.2f}" for v in figs["acc"])
            lines.append(f"| {name} | {fmt(figs['acc'])} | {fmt(figs['acc_sampled'])} | {fmt(figs['acc_swap'])} | "
                         f"{fmt(figs['acc_spaces'])} | {fmt(figs['tokens_per_answer'], 1)} | "
                         f"{fmt(figs['train_seconds'], 1)} | {per_seed} |")
        lines.append("")
    n = verdict["seeds"]
    lines += ["## Claims, seed by seed", "",
              f"- explicit CoT (the start) beats answer-only (greedy acc): {verdict['explicit_beats_answer_only']}/{n} seeds",
              f"- step-internalised beats answer-only: {verdict['internalised_steps_beats_answer_only']}/{n} seeds",
              f"- token-internalised (Deng et al.) beats answer-only: "
              f"{verdict['internalised_tokens_beats_answer_only']}/{n} seeds",
              f"- both internalised models write fewer tokens than explicit: "
              f"{verdict['internalised_fewer_tokens_than_explicit']}/{n} seeds", "",
              "Each noise condition minus no noise, seed by seed: mean difference [95 % t-interval] (seeds better / "
              f"worse), and the verdict. The verdict reads the interval corrected for the {verdict['comparisons']} "
              "comparisons made (Bonferroni): at 95 % each, about one in twenty would exclude 0 by chance alone.", "",
              "| condition | " + " | ".join(ROBUSTNESS) + " |", "|" + "---|" * (len(ROBUSTNESS) + 1)]
    for name, entry in verdict["noise_vs_noise_free"].items():
        cells = [f"{e['mean_diff']:+.3f} [{e['low']:+.3f}, {e['high']:+.3f}] ({e['better']}/{e['worse']}); "
                 f"corrected [{e['family_low']:+.3f}, {e['family_high']:+.3f}] {e['verdict']}"
                 for e in (entry[m] for m in ROBUSTNESS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--full-grid", action="store_true", help="every schedule x r0 in part 2")
    ap.add_argument("--quick", action="store_true", help="a few steps, one seed, a tiny test set (CI)")
    ap.add_argument("--out", default=None, help="folder for storm_sweep.{json,md} (default benchmarks/results; "
                                                "--quick: a temporary folder)")
    ap.add_argument("--cot-steps", type=int, default=None, help="part 1's budget (default: the notebook's)")
    ap.add_argument("--storm-steps", type=int, default=None, help="part 2's budget (default: the notebook's)")
    ap.add_argument("--digits", type=int, default=None, help="2 or 3: the sums' digits (default: the notebook's, 3)")
    ap.add_argument("--name", default="storm_sweep", help="file stem of the outputs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ.setdefault("APT_COURSE_QUIET", "1")

    import torch

    from apt_course.storm import StudyConfig, run_study

    torch.set_num_threads(args.threads)
    study = StudyConfig(full_grid=args.full_grid)
    if args.cot_steps:
        study = replace(study, cot_steps=args.cot_steps)
    if args.storm_steps:
        study = replace(study, storm_steps=args.storm_steps)
    if args.digits:
        study = replace(study, digits=args.digits)
    seeds = args.seeds
    if args.quick:
        study = replace(study, cot_steps=2, storm_steps=1, batch_size=8, n_train=32, n_test=4, max_new_tokens=8)
        seeds = seeds[:1] if args.seeds != [0, 1, 2, 3, 4] else [0]
    if not seeds:
        ap.error("give at least one seed")
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.quick else ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/storm_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])

    start = time.perf_counter()
    runs = {}
    for seed in seeds:
        t0 = time.perf_counter()
        runs[seed] = run_study(seed, study)
        print(f"seed {seed}: start {runs[seed]['start']['acc']:.2f}  "
              + "  ".join(f"{name} {r['metrics']['acc']:.2f}" for part in ("cot", "storm")
                          for name, r in runs[seed][part].items()) + f"  ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    seconds = time.perf_counter() - start
    summary = summarise(runs)
    verdict = claims(summary)
    for run in runs.values():
        run["start"].pop("examples", None)
        for conditions in (run["cot"], run["storm"]):
            for r in conditions.values():
                r["metrics"].pop("examples", None)
                r["history"] = {k: v for k, v in r["history"].items() if k in ("step", "loss", "clean_loss")}
    record = {"command": command.strip(), "seconds": seconds, "torch": torch.__version__, "seeds": seeds,
              "study": asdict(study), "summary": summary, "claims": verdict,
              "runs": {str(s): r for s, r in runs.items()}}
    parts = [summary["cot"], summary["storm"], {"start": summary["start"]}]
    for v in (x for part in parts for figs in part.values() for vals in figs.values() for x in vals):
        if math.isnan(v):
            raise SystemExit("a figure is NaN: the sweep failed, see above")
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(summary, verdict, seeds, asdict(study), command.strip(), seconds))
    print((out / f"{args.name}.md").read_text())
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
