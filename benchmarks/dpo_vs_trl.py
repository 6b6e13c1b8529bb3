"""Wall time of one epoch of DPO: the course's from-scratch loop against TRL's DPOTrainer, in one run.

    python benchmarks/dpo_vs_trl.py                 # 256 tiny-world pairs, batch 16, the SFT checkpoint
    python benchmarks/dpo_vs_trl.py --pairs 512 --threads 2

Both start from the same checkpoint (loaded by path; the reference is a second copy), see the same pairs in
the same chat format, take the same number of optimiser steps (one epoch: pairs / batch) with AdamW at the same
learning rate, compute the reference log-probs on the fly, and run in float32 on the CPU with no gradient
checkpointing. TRL's time includes its per-step logging and metric gathering but not building the trainer
(dataset tokenisation is timed separately). Prints both times and the ratio TRL / from scratch.
"""

import argparse
import os
import tempfile
import time
import warnings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-4)
    args = parser.parse_args()
    os.environ.setdefault("APT_COURSE_QUIET", "1")

    import torch
    import trl
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging

    from apt_course import world
    from apt_course.checkpoints import checkpoint_path
    from apt_course.data import to_trl_preference_dataset
    from apt_course.dpo import DPOConfig, train_dpo
    from apt_course.model import load_pretrained

    torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    pairs = world.preference_pairs(args.pairs, "train", seed=0)
    steps = args.pairs // args.batch_size
    path = checkpoint_path("sft")

    # from scratch
    policy, tok = load_pretrained(path)
    ref, _ = load_pretrained(path)
    cfg = DPOConfig(steps=steps, batch_size=args.batch_size, lr=args.lr, beta=args.beta, warmup=0)
    start = time.perf_counter()
    train_dpo(policy, ref, tok, pairs, cfg)
    ours = time.perf_counter() - start

    # TRL
    policy, tok = load_pretrained(path)
    ref, _ = load_pretrained(path)
    ds = to_trl_preference_dataset(pairs)  # conversational: TRL applies the chat template
    with tempfile.TemporaryDirectory() as tmp:
        targs = trl.DPOConfig(output_dir=tmp, beta=args.beta, learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
                          num_train_epochs=1, max_steps=steps, lr_scheduler_type="cosine", warmup_steps=0,
                          report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False,
                          save_strategy="no", logging_steps=5, disable_tqdm=True, seed=0, dataloader_num_workers=0)
        start = time.perf_counter()
        trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=targs, train_dataset=ds, processing_class=tok)
        trainer.remove_callback(PrinterCallback)  # no log lines in the timing
        setup = time.perf_counter() - start
        start = time.perf_counter()
        trainer.train()
        theirs = time.perf_counter() - start

    print(f"one epoch: {args.pairs} pairs, batch {args.batch_size}, {steps} steps, {args.threads} thread(s), "
          f"torch {torch.__version__}")
    print(f"from scratch (train_dpo): {ours:7.2f} s  ({1000 * ours / steps:.0f} ms/step)")
    print(f"TRL DPOTrainer.train():   {theirs:7.2f} s  ({1000 * theirs / steps:.0f} ms/step); "
          f"building the trainer (tokenising): {setup:.2f} s")
    print(f"ratio TRL / from scratch: {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
