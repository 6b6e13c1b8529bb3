"""``apt-course launch``: the APT launcher's menu on standard input, driven by the same functions as the commands
(:func:`apt_course.cli.prepare`, :func:`~apt_course.cli.train`, :func:`~apt_course.cli.dataset_info`,
:func:`~apt_course.cli.report`). A wrong choice is answered with the valid ones; end of input quits."""

from __future__ import annotations

import sys
from pathlib import Path

from . import cli
from .pipeline import STAGES, PipelineConfig, PipelineError

MENU = {
    "1": ("prepare the datasets (the tiny world, offline)", None),
    "2": ("train: standard (SFT -> GRPO)", ("sft", "grpo")),
    "3": ("train: loyalty (SFT -> loyalty)", ("sft", "loyalty")),
    "4": ("train: storm (SFT -> storm)", ("sft", "storm")),
    "5": ("train: all stages (SFT -> DPO -> GRPO -> loyalty -> storm)", STAGES),
    "6": ("dataset info", None),
    "7": ("results (the last run's table and plots)", None),
    "q": ("quit", None),
}


def launch(data_dir=None, output_dir=None, stdin=None, stdout=None, config: PipelineConfig | None = None) -> int:
    """Show the menu, read choices until ``q`` or end of input. ``config``: budgets for the training entries."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    data_dir = Path(data_dir or cli.DEFAULT_DATA_DIR)
    output_dir = Path(output_dir or "runs/apt_pipeline")

    def say(text=""):
        print(text, file=stdout, flush=True)

    while True:
        say("\nAPT launcher")
        for key, (label, _) in MENU.items():
            say(f"  {key}) {label}")
        stdout.write("choice: ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            say()
            return 0
        choice = line.strip().lower()
        if choice not in MENU:
            say(f"unknown choice {choice!r}: type one of {', '.join(MENU)}")
            continue
        if choice == "q":
            return 0
        try:
            if choice == "1":
                cli.prepare(data_dir, tiny=True, log=say)
            elif choice == "6":
                say(cli.format_info(cli.dataset_info(data_dir)))
            elif choice == "7":
                cli.report(output_dir, log=say)
            else:
                run_stages = MENU[choice][1]
                base = config or PipelineConfig()
                values = {**vars(base), "data_dir": str(data_dir),
                          "output_dir": str(output_dir / "_".join(run_stages) if choice != "5" else output_dir),
                          "skip": [s for s in STAGES if s not in run_stages]}
                cli.train(PipelineConfig(**values), log=say)
        except (PipelineError, FileNotFoundError) as e:
            say(f"error: {e}")
