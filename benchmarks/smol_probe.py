"""Probe: tasks on which the real SmolLM2-135M-Instruct is measurably wrong, and which SFT, DPO and GRPO (the
course's own trainers, LoRA on the attention projections) fix on held-out prompts within a CPU budget.

    python benchmarks/smol_probe.py base                 # what the model does before any training
    python benchmarks/smol_probe.py sft --seed 0         # one method, one seed; prints a JSON line
    python benchmarks/smol_probe.py all --seeds 0 1 2    # every method at several seeds

The task is addition in English, ``What is 7 plus 12?`` with operands 0-19; a prompt belongs to the held-out
split by the tiny world's CRC rule (:func:`apt_course.world.split_of`), so train and test never share one.
The base model answers in its own format ("7 + 12 = 19", sometimes rambling, sometimes wrong), never with
the bare number:

* SFT:  the prompt asks "Answer with the number only."; demonstrations give the bare sum. Metric: the share
  of held-out greedy replies that are exactly the correct number.
* DPO:  the prompt has no format instruction; pairs prefer the bare sum (chosen) over the same sum in the
  model's own "a + b = c" or wrapped in an explanation (rejected): concise over rambling. Metric: the share of
  held-out replies that are a bare number. Plain DPO (sft_weight 0) drives the loss to 0.01 while the model
  escapes both answers ("A classic riddle, but..."); with the NLL term on the chosen answer (RPO, weight 1)
  it becomes concise.
* GRPO: the prompt of SFT; reward 1 for exactly the correct number (``--reward exact``: measured, the base
  model samples it once in 384 tries, so 12 steps learn nothing) or for a reply whose last number is the sum
  (``--reward sum``, the default: reachable from the start, not yet measured).

Torch runs on ``$APT_COURSE_THREADS`` threads (default 1). Needs the converted model
(``python -m apt_course prepare-model``).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from apt_course import dpo, grpo, lm, sft, world  # noqa: E402
from apt_course.model import load_pretrained  # noqa: E402
from apt_course.real_model import smol_model_path  # noqa: E402
from apt_course.tokenizer import format_prompt  # noqa: E402
from apt_course.utils import set_cpu_threads, set_seed  # noqa: E402

ASK = "What is {a} plus {b}?"
NUMBER_ONLY = " Answer with the number only."
HABIT = "{a} + {b} = {c}"  # the base model's own way of answering
RAMBLES = ("{a} + {b} = {c}. This is a classic example of addition: we start at {a} and count {b} more.",
           "To add {a} and {b}, we combine the two numbers. {a} + {b} = {c}, so the answer is {c}.",
           "Sure! Let me work it out step by step. {a} + {b} = {c}. I hope this helps!")


def problems(split: str, instruction: str = NUMBER_ONLY, top: int = 20) -> list[dict]:
    """Every ``a + b`` (0 <= a, b < top) whose plain question lies in ``split``; ``prompt`` carries the instruction."""
    rows = []
    for a in range(top):
        for b in range(top):
            question = ASK.format(a=a, b=b)
            if world.split_of(question) == split:
                rows.append({"prompt": question + instruction, "answer": str(a + b), "a": a, "b": b})
    return rows


def is_exact(answer: str, completion: str) -> bool:
    return completion.strip().rstrip(".") == answer


def last_number(completion: str) -> str | None:
    found = re.findall(r"-?\d+", completion)
    return found[-1] if found else None


def evaluate(model, tokenizer, rows: list[dict], max_new_tokens: int = 12) -> dict:
    start = time.perf_counter()
    outs = lm.generate(model, tokenizer, [format_prompt(tokenizer, r["prompt"]) for r in rows],
                       max_new_tokens=max_new_tokens, batch_size=32)
    exact = sum(is_exact(r["answer"], o) for r, o in zip(rows, outs)) / len(rows)
    bare = sum(bool(re.fullmatch(r"\d+", o.strip().rstrip("."))) for o in outs) / len(rows)
    right = sum(last_number(o) == r["answer"] for r, o in zip(rows, outs)) / len(rows)
    return {"exact": round(exact, 3), "bare_number": round(bare, 3), "sum_right": round(right, 3),
            "eval_s": round(time.perf_counter() - start, 1), "samples": outs[:3]}


def load(lora_r: int, seed: int):
    model, tokenizer = load_pretrained(smol_model_path())
    return (sft.add_lora(model, r=lora_r, alpha=2 * lora_r, seed=seed) if lora_r else model), tokenizer


def exact_reward(prompts, completions, answer, **kwargs) -> list[float]:
    return [float(is_exact(a, c)) for a, c in zip(answer, completions)]


def sum_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1 when the last number of the reply is the sum, whatever the format (reachable: ~20-30% at the start)."""
    return [float(last_number(c) == a) for a, c in zip(answer, completions)]


def run(method: str, seed: int, args) -> dict:
    set_seed(seed)
    model, tokenizer = load(args.lora_r, seed)
    instruction = "" if method == "dpo" else NUMBER_ONLY
    test = random.Random(1234).sample(problems("test", instruction), args.n_test)
    train = problems("train", instruction)
    before = evaluate(model, tokenizer, test)
    start = time.perf_counter()
    if method == "sft":
        examples = [{"prompt": r["prompt"], "completion": r["answer"]} for r in train]
        config = sft.SFTConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=2, seed=seed,
                               log_every=1)
        history = sft.train_sft(model, tokenizer, examples, config)
        curve = history["loss"]
    elif method == "dpo":
        rng = random.Random(seed)
        rejected = {"ramble": RAMBLES, "habit": (HABIT,), "mix": (HABIT,) + RAMBLES}[args.rejected]
        pairs = [{"prompt": r["prompt"], "chosen": r["answer"],
                  "rejected": rng.choice(rejected).format(a=r["a"], b=r["b"], c=r["answer"])} for r in train]
        ref, _ = load_pretrained(smol_model_path())
        config = dpo.DPOConfig(beta=args.beta, sft_weight=args.sft_weight, steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=2,
                               seed=seed, log_every=1)
        history = dpo.train_dpo(model, ref, tokenizer, pairs, config)
        curve = history["loss"]
        del ref
    elif method == "grpo":
        rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in train]
        config = grpo.GRPOConfig(steps=args.steps, prompts_per_step=args.batch_size, group_size=args.group_size,
                                 lr=args.lr, beta=0.0, max_new_tokens=args.max_new_tokens, seed=seed, log_every=1)
        reward = {"exact": exact_reward, "sum": sum_reward}[args.reward]
        history = grpo.train_grpo(model, None, tokenizer, rows, [reward], config)
        curve = history["reward_mean"]
    else:
        raise ValueError(method)
    train_s = time.perf_counter() - start
    after = evaluate(model, tokenizer, test)
    extra = {"beta": args.beta, "sft_weight": args.sft_weight, "rejected": args.rejected} if method == "dpo" else \
        {"group_size": args.group_size, "max_new_tokens": args.max_new_tokens, "reward": args.reward} \
        if method == "grpo" else {}
    return {"method": method, "seed": seed, **extra, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "lora_r": args.lora_r, "threads": torch.get_num_threads(), "n_test": len(test),
            "before": before, "after": after, "train_s": round(train_s, 1),
            "curve": [round(x, 3) for x in curve]}


DEFAULTS = {  # per method: steps, batch size (GRPO: prompts per step), learning rate
    "sft": dict(steps=16, batch_size=8, lr=1e-3),
    "dpo": dict(steps=10, batch_size=4, lr=1e-3),
    "grpo": dict(steps=16, batch_size=4, lr=1e-3),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=["base", "sft", "dpo", "grpo", "all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank on q/k/v/o (0 = full fine-tuning)")
    parser.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
    parser.add_argument("--sft-weight", type=float, default=1.0,
                        help="DPO's NLL weight on the chosen answers (at 0 the model escapes both answers: "
                             "'A classic riddle...')")
    parser.add_argument("--rejected", choices=["ramble", "habit", "mix"], default="mix",
                        help="DPO's rejected answers: rambling explanations, the model's own 'a + b = c', or both")
    parser.add_argument("--reward", choices=["exact", "sum"], default="sum",
                        help="GRPO's reward: exactly the bare sum (never sampled by the base model: no signal), "
                             "or the reply's last number is the sum")
    parser.add_argument("--group-size", type=int, default=8, help="GRPO's G")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="GRPO's completion cap")
    parser.add_argument("--n-test", type=int, default=48, help="held-out prompts evaluated")
    args = parser.parse_args(argv)
    set_cpu_threads()
    if args.method == "base":
        model, tokenizer = load_pretrained(smol_model_path())
        for instruction in (NUMBER_ONLY, ""):
            test = random.Random(1234).sample(problems("test", instruction), args.n_test)
            print(json.dumps({"instruction": instruction, **evaluate(model, tokenizer, test, 24)}), flush=True)
        return 0
    for method in (["sft", "dpo", "grpo"] if args.method == "all" else [args.method]):
        for seed in args.seeds:
            margs = argparse.Namespace(**{**vars(args), **{k: v if getattr(args, k) is None else getattr(args, k)
                                                           for k, v in DEFAULTS[method].items()}})
            print(json.dumps(run(method, seed, margs)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
