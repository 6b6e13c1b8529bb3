"""How the capstone's loyalty stage ends: variants of the hardening after GRPO, at several seeds.

For each seed the pipeline runs once on the tiny world up to the loyalty stage's GRPO (``--skip storm``,
``loyalty_harden_steps=0``, ``loyalty_dpo_steps=0``): that model is the common start. Each variant then hardens a
copy and is measured on the stage's own held-out rows (the spoof rate the notebook asserts), on 300 further
held-out spoof attempts (the "attack set", per kind of claim) and on general accuracy (held-out instructions,
no system message). Variants are comma-separated settings:

    steps=60      SFT steps on the template + as many plain SFT rows (rehearsal)   (the pipeline: 60)
    lr=1e-3 bs=32 that SFT's learning rate and batch
    plain=1       plain rows per template row in that SFT
    dpo=30        then DPO steps (with the NLL term) on the template's pairs         (the pipeline: 30)
    dlr=5e-4 beta=0.1 dbs=32   that DPO's learning rate, beta, batch         (the pipeline: 1e-3, 0.1, 16)
    dplain=1      rehearsal pairs per template pair: plain answer over the same in owner style (the pipeline: 1)

    python benchmarks/capstone_hardening.py --seeds 0 1 2 3 4 --variants steps=60 steps=60,dpo=30,dplain=1,dbs=16,dlr=1e-3
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from apt_course import cli, loyalty, pipeline  # noqa: E402
from apt_course.dpo import DPOConfig, train_dpo  # noqa: E402
from apt_course.loyalty import OWNER_STYLE, loyalty_metrics, spoof_rates_by_claim  # noqa: E402
from apt_course.pipeline import PipelineConfig  # noqa: E402
from apt_course.sft import SFTConfig, train_sft  # noqa: E402
from apt_course.utils import set_cpu_threads, set_seed, write_atomic  # noqa: E402


def start(seed: int, work: Path) -> Path:
    """The pipeline up to the loyalty stage's GRPO (no hardening), once per seed; returns the data folder."""
    d = work / f"seed{seed}"
    if not (d / "run" / "loyalty_model").is_dir():
        set_seed(seed)
        cli.prepare(d / "data", tiny=True, seed=seed, log=lambda s: None)
        cli.train(PipelineConfig(output_dir=str(d / "run"), data_dir=str(d / "data"), seed=seed, skip=["storm"],
                                 loyalty_harden_steps=0, loyalty_dpo_steps=0), log=lambda *a: None)
    return d


def run_variant(variant: str, seed: int, d: Path) -> dict:
    o = dict(kv.split("=") for kv in variant.split(",") if "=" in kv)
    set_seed(seed)
    c = pipeline.resolve_paths(PipelineConfig(output_dir=str(d / "run"), data_dir=str(d / "data"), seed=seed))
    p = pipeline.Pipeline(c, log=lambda *a: None)
    model, tok = p.load(d / "run" / "loyalty_model")
    mt = p.max_new_tokens
    tests = []
    for path, owner in ((pipeline._files(c.owner_data)[0], True), (pipeline._files(c.public_data)[0], False)):
        rows = pipeline.read_loyalty_prompts(path, owner)
        reader = lambda q, w=owner: pipeline.read_loyalty_prompts(q, w)  # noqa: E731
        tests += pipeline.split_heldout(rows, path, reader, c.n_eval, seed)[1]
    attacks = [r for r in loyalty.loyalty_requests(600, "test", seed + 555, spoof_fraction=1.0) if r["spoofed"]][:300]
    pairs, _ = pipeline.read_template(pipeline._files(c.loyalty_template)[0])
    rows = [{"prompt": q["prompt"], "system": q["system"], "completion": q["chosen"]} for q in pairs]
    plain = [r for r in p.sft_heldout()[0] if not r.get("system")]
    rows += random.Random(seed).sample(plain, min(len(plain), int(len(rows) * float(o.get("plain", 1)))))
    if int(o.get("steps", 60)):
        train_sft(model, tok, rows, SFTConfig(steps=int(o.get("steps", 60)), batch_size=int(o.get("bs", 32)),
                                              lr=float(o.get("lr", 1e-3)), warmup=0, seed=seed + 7))
    if int(o.get("dpo", 0)):
        rehearse = random.Random(seed + 3).sample(plain, min(len(plain), int(len(pairs) * float(o.get("dplain", 0)))))
        pairs = pairs + [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": OWNER_STYLE + r["completion"]}
                         for r in rehearse]
        train_dpo(model, copy.deepcopy(model).eval(), tok, pairs, DPOConfig(
            steps=int(o["dpo"]), batch_size=int(o.get("dbs", 32)), lr=float(o.get("dlr", 5e-4)),
            beta=float(o.get("beta", 0.1)), sft_weight=1.0, warmup=0, seed=seed + 9))
    test = loyalty_metrics(model, tok, [dict(r, answer=r["answer"] or "") for r in tests], mt)
    by_claim = spoof_rates_by_claim(model, tok, attacks, mt)
    return {"variant": variant, "seed": seed, "gap": test["gap"], "spoof_rate": test["spoof_rate"],
            "attack_spoof_rate": by_claim["all"], "general_acc": p.general_acc(model, tok),
            "attack_by_claim": {k: v for k, v in by_claim.items() if k != "all"}}


def write_table(results: list[dict], path: Path) -> None:
    """Per variant and seed: held-out spoof rate / attack-set spoof rate / general accuracy / gap."""
    variants = list(dict.fromkeys(r["variant"] for r in results))
    seeds = sorted({r["seed"] for r in results})
    cell = {(r["variant"], r["seed"]): r for r in results}
    lines = ["# Capstone: how the loyalty stage ends (`benchmarks/capstone_hardening.py`)", "",
             "Each cell: spoof rate on the stage's held-out rows (what chapter 13 asserts) / on 300 further held-out "
             "spoof attempts / general accuracy / loyalty gap. Same post-GRPO model per seed for every variant.", "",
             "Variants: `steps` hardening SFT steps (template + plain rows), `dpo` DPO steps after it on the "
             "template's pairs, `dplain` rehearsal pairs per template pair, `dbs` the DPO batch. The pipeline's "
             "default (`loyalty_harden_steps=60`, `loyalty_dpo_steps=30`, `loyalty_dpo_lr=1e-3`, "
             "`dpo_batch_size=16`) is `steps=60,dpo=30,dplain=1,dbs=16,dlr=1e-3`.", "",
             "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---" * (len(seeds) + 1) + "|"]
    for v in variants:
        lines.append(f"| `{v}` | " + " | ".join(
            "{spoof_rate:.3f} / {attack_spoof_rate:.3f} / {general_acc:.2f} / {gap:.2f}".format(**cell[v, s])
            if (v, s) in cell else "" for s in seeds) + " |")
    write_atomic(path, "\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--variants", nargs="+", default=["steps=60", "steps=60,dpo=30,dplain=1,dbs=16,dlr=1e-3"])
    ap.add_argument("--work", default="/tmp/apt_capstone_hardening")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "capstone_hardening.json"))
    args = ap.parse_args(argv)
    set_cpu_threads(1)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else []
    for seed in args.seeds:
        d = start(seed, Path(args.work))
        for variant in args.variants:
            r = run_variant(variant, seed, d)
            results = [x for x in results if (x["variant"], x["seed"]) != (variant, seed)] + [r]
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()
                              if k != "attack_by_claim"}), flush=True)
            write_atomic(out, json.dumps(results, indent=1))
    write_table(results, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
