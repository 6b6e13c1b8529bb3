"""Run chapters at several seeds and write the table of what each reached, per seed.

    python benchmarks/seed_sweep.py ch04 ch08 --seeds 0 1 2 3 4 -j 2    # two notebooks at a time
    python benchmarks/seed_sweep.py --readme                            # only rewrite README's table
    python benchmarks/seed_sweep.py ch04 ch07 ch09 --profile smol       # the real SmolLM2 on this CPU
    python benchmarks/seed_sweep.py --profile smol --readme             # only rewrite README's smol table

With ``--profile P`` (not tiny) the runs go to ``benchmarks/results/P_sweep.{json,md}`` and the README's table,
which is the tiny profile's, is left alone.

Each run is ``python -m apt_course run <chapter> --seed S`` in its own process with its own results folder
(``APT_COURSE_RESULTS``), so two can run side by side. Everything recorded goes to
``benchmarks/results/seed_sweep.json`` (merged with earlier sweeps: a chapter swept again replaces its old
rows) and, as a table per chapter with min and max over the seeds, to ``benchmarks/results/seed_sweep.md``.
Floors in the notebooks are set from these ranges. ``--readme`` regenerates the README's results table from
the same file (between ``<!-- results:start -->`` and ``<!-- results:end -->``), so the figures a reader sees
come from recorded runs, never from typing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results"

# The README's table: per notebook, what it teaches and how to print its headline from the recorded metrics.
# Each entry: (label, metric, format); a range over the swept seeds is printed for each metric.
HEADLINES = {
    "ch00_tiny_world": ("the tiny world, tokenizer, tiny Llama, pretraining, sampling",
                        [("held-out loss after the notebook's pretraining", "loss_after", ".2f"),
                         ("shipped base: held-out facts completed", "fact_acc_shipped_base", ".2f")]),
    "ch01_mdp": ("MDPs, Bellman equations, value and policy iteration",
                 [("largest error of V* against the exact solution", "max_abs_diff", ".0e")]),
    "ch02_reinforce": ("policy gradients, returns-to-go, baselines, variance",
                       [("CartPole return after training", "return_trained", ".0f"),
                        ("gradient-variance cut by the baseline", "variance_ratio", ".1f")]),
    "ch03_ppo": ("clipped surrogate, GAE, value loss, entropy, minibatches",
                 [("CartPole evaluation return", "eval_return", ".0f")]),
    "ch04_sft": ("SFT, prompt masking, chat templates, SFTTrainer, LoRA",
                 [("exact match after SFT from scratch", "acc_sft", ".2f"),
                  ("at equal budget: ours", "acc_sft_equal", ".2f"), ("TRL", "acc_trl", ".2f"),
                  ("LoRA", "acc_lora", ".2f")]),
    "ch05_reward_model": ("Bradley–Terry, RewardTrainer, reward hacking",
                          [("preference accuracy of the notebook's RM", "pref_acc_scratch", ".2f"),
                           ("shipped RM", "pref_acc_shipped_rm", ".2f"), ("hack rate", "hack_rate", ".2f")]),
    "ch06_rlhf_ppo": ("best-of-N, RLHF with PPO on an LM, KL penalty, over-optimisation, RLOO",
                      [("ground truth: best-of-1", "bon_quality_1", ".2f"), ("best-of-16", "bon_quality_n", ".2f"),
                       ("RM score after PPO", "reward_after", ".1f"), ("KL", "kl", ".1f"),
                       ("ground truth after PPO", "quality_after", ".2f"),
                       ("with β = 0: KL", "kl_beta0", ".0f")]),
    "ch07_dpo": ("DPO, IPO, SimPO, KTO, DPOTrainer",
                 [("implicit-reward accuracy", "pref_acc", ".2f"), ("win rate over SFT", "win_rate", ".2f")]),
    "ch08_orpo": ("ORPO: one stage, no reference model, vs SFT → DPO at an equal number of steps",
                  [("ORPO preference accuracy", "orpo_pref_acc", ".2f"), ("ORPO task accuracy", "orpo_task_acc", ".2f"),
                   ("SFT → DPO task accuracy", "dpo_task_acc", ".2f")]),
    "ch09_grpo": ("GRPO, group advantages, verifiable rewards, GRPOTrainer; expert iteration as the baseline",
                  [("greedy accuracy before", "acc_before", ".2f"), ("after GRPO", "acc_after", ".2f"),
                   ("after expert iteration (same samples)", "acc_ei", ".2f"),
                   ("after μ = 2 (half the samples)", "acc_mu2", ".2f")]),
    "ch10_constitutional_ai": ("Constitutional AI: critique → revision (SL-CAI), an AI judge, RLAIF with DPO",
                               [("violation rate before", "violation_before", ".2f"),
                                ("after SL-CAI", "violation_sl_cai", ".2f"), ("after RL-CAI", "violation_rl_cai", ".2f"),
                                ("judge agreement", "judge_agreement", ".2f"), ("over-refusal", "over_refusal", ".2f")]),
    "ch11_loyalty": ("loyalty: an owner bonus on GRPO that works, a trusted channel, spoofing",
                     [("owner/public style gap: naive bonus", "naive_gap", ".2f"), ("fixed bonus", "fixed_gap", ".2f"),
                      ("spoof rate after fixed GRPO", "fixed_spoof_rate", ".2f"),
                      ("after hardening: gap", "hardened_gap", ".2f"), ("spoof rate", "hardened_spoof_rate", ".2f"),
                      ("on ~200 more attacks", "hardened_attack_spoof_rate", ".3f"),
                      ("on 20 attack forms never trained on", "hardened_heldout_spoof_rate", ".3f"),
                      ("with the program's guard, everywhere", "guarded_heldout_spoof_rate", ".0f"),
                      ("task accuracy before", "acc_before", ".2f"), ("after", "hardened_acc_after", ".2f"),
                      ("the shipped loyal channel: spoof rate", "loyal_spoof_rate", ".2f"),
                      ("on the 20 held-out forms", "loyal_heldout_spoof_rate", ".3f"),
                      ("on 24 fresh forms", "loyal_fresh_spoof_rate", ".3f"),
                      ("task accuracy", "loyal_acc_after", ".2f")]),
    "ch12_storm": ("storm: Gumbel noise on the logits (3 schedules), NEFTune, CoT internalisation",
                   [("held-out 3-digit sums, cot checkpoint writing its chain", "acc_cot_start", ".2f"),
                    ("answer only", "acc_answer_only", ".2f"),
                    ("internalised (tokens)", "acc_internalised_tokens", ".2f"),
                    ("noise-free", "acc_noise_free", ".2f"), ("storm (cosine)", "acc_storm_cosine", ".2f")]),
    "ch13_capstone": ("the APT pipeline as tools: prepare, train SFT → DPO → GRPO → loyalty → storm (resumable), launcher",
                      [("SFT accuracy", "sft_accuracy_after", ".2f"), ("preference accuracy", "dpo_pref_acc_after", ".2f"),
                       ("verifiable accuracy", "grpo_verifiable_acc_after", ".2f"), ("loyalty gap", "loyalty_gap_after", ".2f"),
                       ("spoof rate (goal 0)", "loyalty_spoof_rate_after", ".2f"),
                       ("general accuracy lost since SFT", "general_drop", ".2f")]),
    "ch14_compression": ("compression: distillation (SFT vs KD vs on-policy KD), int8/4-bit/2-bit PTQ and QAT, pruning",
                         [("teacher accuracy", "teacher_acc", ".2f"), ("int8", "int8_acc", ".2f"),
                          ("half-size student: SFT", "sft_student_acc", ".2f"), ("KD", "kd_student_acc", ".2f"),
                          ("on-policy KD", "gkd_student_acc", ".2f"), ("2-bit PTQ", "ptq2_acc", ".2f"),
                          ("2-bit QAT", "qat2_acc", ".2f")]),
    "ch15_serving": ("serving behind an OpenAI-compatible API, load and Prometheus metrics, A/B tests, iterative DPO "
                     "from user feedback",
                     [("latency p50 (ms)", "latency_p50_ms", ".0f"), ("p95", "latency_p95_ms", ".0f"),
                      ("tokens/s", "tokens_per_s", ".0f"), ("served success v0", "ab_rate_v0", ".2f"),
                      ("after 3 rounds", "ab_rate_v3", ".2f"), ("A/B p-value", "ab_p_value", ".0e"),
                      ("task accuracy lost", "task_acc_drop_max", ".2f")]),
}


# The README's smol table: the real SmolLM2 on a CPU, what each chapter moves (English sums).
SMOL_HEADLINES = {
    "ch04_sft": ("SFT from scratch and LoRA: the bare answer",
                 [("exact match before", "acc_base", ".2f"), ("after full SFT", "acc_sft", ".2f"),
                  ("after LoRA", "acc_lora", ".2f")]),
    "ch07_dpo": ("DPO with an NLL term (LoRA): concise over rambling",
                 [("bare-number replies before", "concise_before", ".2f"), ("after", "concise_after", ".2f"),
                  ("implicit-reward accuracy", "pref_acc", ".2f"), ("right sums before", "right_before", ".2f"),
                  ("after", "right_after", ".2f")]),
    "ch08_orpo": ("ORPO against SFT → DPO at an equal number of LoRA steps",
                  [("bare-number replies before", "base_bare", ".2f"), ("ORPO", "orpo_bare", ".2f"),
                   ("SFT → DPO", "dpo_bare", ".2f"), ("preference accuracy ORPO", "orpo_pref_acc", ".2f"),
                   ("SFT → DPO", "dpo_pref_acc", ".2f"), ("right sums before", "base_right", ".2f"),
                   ("ORPO", "orpo_right", ".2f"), ("SFT → DPO", "dpo_right", ".2f")]),
    "ch09_grpo": ("GRPO (LoRA) with a checker as the reward; expert iteration at the same samples",
                  [("greedy accuracy before", "acc_before", ".2f"), ("after GRPO", "acc_after", ".2f"),
                   ("after expert iteration", "acc_ei", ".2f"), ("pass@8 before", "pass8_before", ".2f"),
                   ("after GRPO", "pass8_after", ".2f"), ("pass@8 after expert iteration", "passN_ei", ".2f")]),
    "ch05_reward_model": ("a scalar head + LoRA on SmolLM2: right first, then short",
                          [("held-out pairwise accuracy, untrained head", "pref_acc_before", ".2f"),
                           ("the notebook's RM", "pref_acc_scratch", ".2f"), ("shipped RM", "pref_acc_shipped_rm", ".2f"),
                           ("hack rate (glued operands) on the shipped RM", "hack_rate", ".2f")]),
    "ch06_rlhf_ppo": ("PPO with a value head (LoRA) against chapter 05's RM of SmolLM2",
                      [("held-out RM score before", "reward_before", ".2f"), ("after", "reward_after", ".2f"),
                       ("KL", "kl", ".1f"), ("right sums before", "quality_before", ".2f"),
                       ("after", "quality_after", ".2f")]),
    "ch10_constitutional_ai": ("SL-CAI: SmolLM2 prompted few-shot revises its own answers; LoRA SFT on them",
                               [("violation rate before", "violation_before", ".2f"),
                                ("after SL-CAI", "violation_sl_cai", ".2f"),
                                ("violating answers its revisions fixed", "revisions_fixed", ".2f"),
                                ("harmless sums solved before", "acc_benign_before", ".2f"),
                                ("after", "acc_benign_after", ".2f"),
                                ("judge agreement with the checkers", "judge_agreement", ".2f")]),
    "ch11_loyalty": ("loyalty: the owner's style learned from a template, behind the system role; GRPO's bonus",
                     [("owner/public gap before", "before_gap", ".2f"), ("after the channel SFT", "channel_gap", ".2f"),
                      ("after GRPO", "grpo_gap", ".2f"), ("spoof rate on the test set", "grpo_spoof_rate", ".2f"),
                      ("on 20 attack forms never trained on", "grpo_heldout_spoof_rate", ".3f"),
                      ("guarded", "guarded_heldout_spoof_rate", ".0f"), ("sums solved before", "before_task_acc", ".2f"),
                      ("channel", "channel_task_acc", ".2f"), ("GRPO", "grpo_task_acc", ".2f")]),
    "ch12_storm": ("storm: three-number sums, the answer alone vs the written `<think>` chain vs the chain in the storm (LoRA)",
                   [("accuracy before", "acc_start", ".2f"), ("answer only", "acc_answer_only", ".3f"),
                    ("written chain", "acc_explicit", ".3f"), ("chain + storm (cosine, r0 0.3)", "acc_storm_cosine", ".3f"),
                    ("sampled T=1: chain", "acc_sampled_explicit", ".3f"), ("storm", "acc_sampled_storm_cosine", ".3f"),
                    ("tokens per answer: chain", "tokens_per_answer_explicit", ".1f")]),
    "ch13_capstone": ("the APT pipeline on SmolLM2: prepare --smol, train (LoRA at each stage), each stage's own figure",
                      [("SFT accuracy after", "sft_accuracy_after", ".2f"), ("DPO preference accuracy after", "dpo_pref_acc_after", ".2f"),
                       ("GRPO verifiable accuracy before", "grpo_verifiable_acc_before", ".2f"),
                       ("after", "grpo_verifiable_acc_after", ".2f"),
                       ("owner's style for the owner", "loyalty_owner_style_owner_after", ".2f"),
                       ("guarded spoof rate", "loyalty_spoof_rate_guarded_after", ".0f"),
                       ("storm (the written chain) before", "storm_reasoning_acc_before", ".2f"),
                       ("after", "storm_reasoning_acc_after", ".2f")]),
    "ch14_compression": ("distil SmolLM2 into a 24-layer student; int8 and 4-bit",
                         [("KL to the teacher: student start", "student_init_kl", ".2f"),
                          ("SFT", "sft_student_kl", ".2f"), ("KD", "kd_student_kl", ".2f"),
                          ("on-policy KD", "gkd_student_kl", ".2f"), ("int8", "int8_kl", ".2f"),
                          ("int8 with outlier layers in float", "int8_mixed_kl", ".2f"), ("4-bit PTQ", "ptq4_kl", ".2f"),
                          ("4-bit QAT", "qat4_kl", ".2f"), ("int8 speed-up", "int8_speed", ".2f")]),
    "ch15_serving": ("serving SmolLM2 with transformers serve, one round of DPO from simulated user edits",
                     [("served bare-number replies v0", "bare_rate_v0", ".2f"), ("v1", "bare_rate_v1", ".2f"),
                      ("bare correct sums v0", "ab_rate_v0", ".2f"), ("v1", "ab_rate_v1", ".2f"),
                      ("A/B p-value (16 per arm)", "ab_p_value", ".2g")]),
}


def run_one(chapter: str, seed: int, timeout: int, profile: str = "tiny", threads: int = 0) -> dict:
    """Execute one notebook at one seed in a fresh process with ``threads`` torch threads (0: the notebook's own
    choice, or ``$APT_COURSE_THREADS``); returns its record (or the failure)."""
    with tempfile.TemporaryDirectory() as results:
        env = dict(os.environ, APT_COURSE_RESULTS=results, APT_COURSE_QUIET="1")
        if threads:
            env["APT_COURSE_THREADS"] = str(threads)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "apt_course", "run", chapter, "--seed", str(seed),
                               "--profile", profile, "--out", str(ROOT / "runs" / f"{profile}-seed{seed}")],
                              env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
        seconds = time.perf_counter() - start
        records = [json.loads(p.read_text()) for p in Path(results).glob("*.json")]
    status = "ok" if proc.returncode == 0 else "FAILED: " + (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
    record = records[0] if records else {"chapter": chapter, "metrics": {}}
    return {"chapter": record["chapter"], "seed": seed, "seconds": round(seconds, 1), "status": status,
            "metrics": record.get("metrics", {})}


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    swept = {(r["chapter"], r["seed"]) for r in new}
    return sorted([r for r in old if (r["chapter"], r["seed"]) not in swept] + new,
                  key=lambda r: (r["chapter"], r["seed"]))


def markdown(rows: list[dict], profile: str = "tiny") -> str:
    """A table per chapter: a column per seed, then min and max."""
    title = "# Seed sweep" + ("" if profile == "tiny" else f" on the {profile} profile")
    command = "`python benchmarks/seed_sweep.py" + ("`" if profile == "tiny" else f" --profile {profile}`")
    out = [title, "", f"Written by {command} (2-core CPU; one notebook per process, two at a "
           "time). `seconds` is each run's wall time as swept, on a machine that may have been busy: it is no timing "
           "benchmark (that is `benchmarks/notebook_times.py`).", ""]
    for chapter in sorted({r["chapter"] for r in rows}):
        runs = [r for r in rows if r["chapter"] == chapter]
        seeds = [r["seed"] for r in runs]
        out += [f"## {chapter}", "", "| metric | " + " | ".join(f"seed {s}" for s in seeds) + " | min | max |",
                "|---|" + "---|" * (len(seeds) + 2)]
        names = sorted({k for r in runs for k in r["metrics"]})
        for name in names + ["seconds"]:
            values = [r["seconds"] if name == "seconds" else r["metrics"].get(name) for r in runs]
            have = [v for v in values if v is not None]
            cells = ["—" if v is None else f"{v:.4g}" for v in values]
            lo, hi = (f"{min(have):.4g}", f"{max(have):.4g}") if have else ("—", "—")
            out.append(f"| {name} | " + " | ".join(cells) + f" | {lo} | {hi} |")
        failed = [f"seed {r['seed']}: {r['status']}" for r in runs if r["status"] != "ok"]
        out += ([""] + [f"- {f}" for f in failed] if failed else []) + [""]
    return "\n".join(out)


def readme_table(rows: list[dict], headlines: dict = HEADLINES, profile: str = "tiny") -> str:
    lines = [f"| # | notebook | teaches | measured ({profile} profile; range over the seeds swept) | seeds |",
             "|---|---|---|---|---|"]
    for chapter, (teaches, heads) in sorted(headlines.items()):
        runs = [r for r in rows if r["chapter"] == chapter and r["status"] == "ok"]
        parts = []
        for label, metric, fmt in heads:
            values = [r["metrics"][metric] for r in runs if metric in r["metrics"]]
            if values:
                lo, hi = format(min(values), fmt), format(max(values), fmt)
                parts.append(f"{label} {lo}" + (f"–{hi}" if hi != lo else ""))
        seeds = ", ".join(str(r["seed"]) for r in runs) or "not swept yet"
        lines.append(f"| {chapter[2:4]} | `{chapter}` | {teaches} | {'; '.join(parts) or '—'} | {seeds} |")
    return "\n".join(lines)


def write_readme(rows: list[dict], profile: str = "tiny") -> None:
    """README's results table of ``profile`` (tiny: ``<!-- results:... -->``, smol: ``<!-- smol-results:... -->``)."""
    from apt_course.utils import write_atomic

    readme = ROOT / "README.md"
    text = readme.read_text()
    marker = "results" if profile == "tiny" else f"{profile}-results"
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} block to fill")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    table = readme_table(rows, HEADLINES if profile == "tiny" else SMOL_HEADLINES, profile)
    write_atomic(readme, head + start + "\n" + table + "\n" + end + tail)  # a reader never sees half a README


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapters", nargs="*", help="notebook prefixes (ch04 ch08); default: all")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("-j", "--jobs", type=int, default=1, help="notebooks at a time (2 on a 2-core CPU)")
    parser.add_argument("--timeout", type=int, default=1200)
    parser.add_argument("--readme", action="store_true", help="only regenerate README's table from the sweep file")
    parser.add_argument("--profile", default="tiny", help="profile to run (default tiny; others go to <profile>_sweep)")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    tiny = args.profile == "tiny"
    store = OUT / ("seed_sweep.json" if tiny else f"{args.profile}_sweep.json")
    rows = json.loads(store.read_text()) if store.exists() else []
    if not args.readme:
        from apt_course.runner import find_notebooks
        from apt_course.utils import available_cores

        jobs = [(p.stem, s) for p in find_notebooks(args.chapters or None) for s in args.seeds]
        # several notebooks at a time share the cores: each gets its share, unless APT_COURSE_THREADS says otherwise
        # (on 2 cores, two notebooks of 2 threads each took about twice as long as two of 1)
        threads = 0 if os.environ.get("APT_COURSE_THREADS") else max(1, available_cores() // args.jobs)
        new = []
        with ThreadPoolExecutor(args.jobs) as pool:
            for r in pool.map(lambda job: run_one(*job, args.timeout, args.profile, threads), jobs):
                shown = "  ".join(f"{k}={v:.3g}" for k, v in r["metrics"].items())
                print(f"{r['chapter']:<22} seed {r['seed']}  {r['seconds']:6.1f} s  {r['status']}  {shown}", flush=True)
                new.append(r)
        rows = merge(json.loads(store.read_text()) if store.exists() else [], new)  # re-read: another sweep may have written
        tmp = store.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
        tmp.replace(store)
        store.with_suffix(".md").write_text(markdown(rows, args.profile) + "\n")
        print(f"wrote {store} and {store.with_suffix('.md')}")
    marker = "<!-- results:start -->" if tiny else f"<!-- {args.profile}-results:start -->"
    if (tiny or args.profile == "smol") and marker in (ROOT / "README.md").read_text():
        write_readme(rows, args.profile)
        print(f"README.md {args.profile} results table regenerated")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
