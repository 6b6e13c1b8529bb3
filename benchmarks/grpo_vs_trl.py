"""One from-scratch GRPO step against one ``trl.GRPOTrainer`` step, same model, same batch size, one run.

Both start from the same saved tiny model (the shipped SFT checkpoint, or a fresh tiny Llama with
``--fresh``), sample G completions for P prompts, score them with the same reward functions, and take one
optimiser step. A step is timed end to end (sampling, scoring, log-probs, backward, optimiser); the
median of ``--repeats`` steps is reported for each, and their ratio.

    python benchmarks/grpo_vs_trl.py [--prompts 16] [--group 8] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from apt_course import (
    grpo,  # noqa: E402
    world,  # noqa: E402
)
from apt_course.lm import format_prompts  # noqa: E402
from apt_course.model import load_pretrained, make_tiny_model, save_model  # noqa: E402
from apt_course.rewards import correctness_reward, format_reward  # noqa: E402
from apt_course.tokenizer import build_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="a fresh tiny Llama instead of the SFT checkpoint")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import trl
    from datasets import Dataset

    if args.fresh:
        tok = build_tokenizer()
        path = save_model(make_tiny_model(tok), tok, tempfile.mkdtemp())
    else:
        from apt_course.checkpoints import checkpoint_path

        path = checkpoint_path("sft")
    model, tok = load_pretrained(path)
    rows = world.verifiable_problems(2000, "train", tasks=("reverse", "sort", "copy"))
    fns, weights = [correctness_reward, format_reward], [1.0, 0.1]
    batch = args.prompts * args.group

    # from scratch: one train_grpo call per step (its set-up - optimiser, prompt formatting - is included)
    ours = []
    for r in range(args.repeats + 1):
        m = copy.deepcopy(model)
        start = time.perf_counter()
        grpo.train_grpo(m, None, tok, rows, fns, grpo.GRPOConfig(steps=1, prompts_per_step=args.prompts, group_size=args.group,
                                                          max_new_tokens=args.max_new_tokens, reward_weights=weights,
                                                          seed=r))
        ours.append(time.perf_counter() - start)

    # TRL: one trainer, timed per optimiser step with a callback
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    trl_rows = [{"prompt": p, "answer": r["answer"]} for p, r in zip(format_prompts(tok, rows), rows)]
    cfg = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), report_to="none", use_cpu=True, bf16=False,
                     max_steps=args.repeats + 1, per_device_train_batch_size=batch, num_generations=args.group,
                     max_completion_length=args.max_new_tokens, beta=0.0, loss_type="dapo", save_strategy="no",
                     logging_steps=1, disable_tqdm=True, reward_weights=weights)
    trainer = trl.GRPOTrainer(model=str(path), reward_funcs=fns, args=cfg, train_dataset=Dataset.from_list(trl_rows),
                          processing_class=tok, callbacks=[timer])
    trainer.train()

    ours_s, trl_s = statistics.median(ours[1:]), statistics.median(timer.times[1:])  # drop the warm-up step
    print(f"batch: {args.prompts} prompts x {args.group} completions, <= {args.max_new_tokens} new tokens, "
          f"{args.threads} thread(s), torch {torch.__version__}")
    print(f"from scratch   one step: {ours_s * 1000:7.1f} ms  (median of {args.repeats})")
    print(f"TRL GRPOTrainer one step: {trl_s * 1000:7.1f} ms  (median of {args.repeats})")
    print(f"ratio from-scratch / TRL: {ours_s / trl_s:.2f}")


if __name__ == "__main__":
    main()
