"""``apt-course launch``: the APT launcher's menu on standard input, driven by the same functions as the commands
(:func:`apt_course.cli.prepare`, :func:`~apt_course.cli.train`, :func:`~apt_course.cli.dataset_info`,
:func:`~apt_course.cli.report`). A wrong choice is answered with the valid ones; end of input quits.

Entry 1 opens the dataset guide's prepare submenu (COIG-CQIA, s1K, hh-rlhf, ruozhiba, the loyalty template, all
of them; and the tiny world, offline), asking for a folder of local copies (Enter: the Hub) and a row limit.
Entry 8 chooses the profile (tiny, smol, gpu) and the base model the training entries start from.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import cli
from .pipeline import STAGES, PipelineConfig, PipelineError, check_base_model

MENU = {
    "1": ("prepare the datasets", None),
    "2": ("train: standard (SFT -> GRPO)", ("sft", "grpo")),
    "3": ("train: loyalty (SFT -> loyalty)", ("sft", "loyalty")),
    "4": ("train: storm (SFT -> storm)", ("sft", "storm")),
    "5": ("train: all stages (SFT -> DPO -> GRPO -> loyalty -> storm)", STAGES),
    "6": ("dataset info", None),
    "7": ("results (the last run's table and plots)", None),
    "8": ("settings: profile and base model", None),
    "q": ("quit", None),
}
# the dataset guide's submenu: label, the cli.prepare parts it writes
PREPARE_MENU = {
    "1": ("COIG-CQIA (48K Chinese instructions) - SFT", ("sft",)),
    "2": ("simplescaling/s1K-1.1 (1K reasoning traces) - storm (CoT)", ("cot",)),
    "3": ("HH-RLHF (160K preferences) - DPO pairs and GRPO prompts (with GSM8K)", ("dpo", "grpo")),
    "4": ("ruozhiba (COIG-CQIA's subset) - reasoning", ("ruozhiba",)),
    "5": ("loyalty template (from HH-RLHF) and owner/public prompts - loyalty", ("loyalty_template",)),
    "6": ("all recommended datasets", ("all",)),
    "7": ("the tiny world (offline, every file the pipeline reads)", ("tiny",)),
    "8": ("the smol world: English sums for the real SmolLM2 (offline, every file the pipeline reads)", ("smol",)),
    "b": ("back", None),
}
PROFILES = ("tiny", "smol", "gpu")
ERRORS = (PipelineError, OSError, KeyError, ValueError, TypeError)  # a bad answer or input: said, menu goes on


class Session:
    """One launcher session: its streams, folders and training settings (profile, base model, budgets)."""

    def __init__(self, data_dir, output_dir, stdin, stdout, config: PipelineConfig | None, profile: str | None,
                 base_model: str | None):
        self.stdin, self.stdout = stdin or sys.stdin, stdout or sys.stdout
        self.data_dir = Path(data_dir or cli.DEFAULT_DATA_DIR)
        self.output_dir = Path(output_dir or "apt_aligned_models")
        self.config = config or PipelineConfig()
        self.profile = profile or self.config.profile
        self.base_model = base_model if base_model is not None else self.config.base_model

    def say(self, text=""):
        print(text, file=self.stdout, flush=True)

    def ask(self, question: str) -> str | None:
        """The stripped answer to ``question``, or None at end of input."""
        self.stdout.write(question)
        self.stdout.flush()
        line = self.stdin.readline()
        return line.strip() if line else None

    def choose(self, title: str, menu: dict) -> str | None:
        """Show ``menu`` until a valid key is typed; None at end of input."""
        while True:
            self.say(f"\n{title}")
            for key, (label, _) in menu.items():
                self.say(f"  {key}) {label}")
            choice = self.ask("choice: ")
            if choice is None:
                self.say()
                return None
            if choice.lower() in menu:
                return choice.lower()
            self.say(f"unknown choice {choice!r}: type one of {', '.join(menu)}")

    # -- entry 1: the prepare submenu
    def prepare(self) -> bool:
        """The guide's prepare submenu; False at end of input."""
        choice = self.choose("prepare which datasets?", PREPARE_MENU)
        if choice is None:
            return False
        if choice == "b":
            return True
        parts = PREPARE_MENU[choice][1]
        if parts in (("tiny",), ("smol",)):
            cli.prepare(self.data_dir, **{parts[0]: True}, log=self.say)
            return True
        source = self.ask("folder of local copies (Enter: download from the Hub): ")
        limit = self.ask("rows per dataset (Enter: all): ") if source is not None else None
        if limit is None:
            return False
        if limit and not limit.isdigit():
            raise PipelineError(f"rows per dataset: {limit!r} is not a whole number; type e.g. 1000, or Enter for all")
        cli.prepare(self.data_dir, source=source or None, max_samples=int(limit) if limit else None, log=self.say,
                    **{p: True for p in parts})
        return True

    # -- entry 8: profile and base model
    def settings(self) -> bool:
        """Ask for the profile and the base model (Enter keeps each); False at end of input."""
        profile = self.ask(f"profile ({'/'.join(PROFILES)}; now {self.profile}, Enter keeps it): ")
        if profile is None:
            return False
        if profile and profile not in PROFILES:
            raise PipelineError(f"unknown profile {profile!r}: type one of {', '.join(PROFILES)}")
        base = self.ask(f"base model (a save_pretrained folder or Hub id; now {self.base_model or 'the profile' + chr(39) + 's'}"
                        ", Enter keeps it, '-' the profile's): ")
        if base is None:
            return False
        if base and base != "-":
            check_base_model(base)
        self.profile = profile or self.profile
        self.base_model = None if base == "-" else base or self.base_model
        self.say(f"profile {self.profile}, base model {self.base_model or 'the profile' + chr(39) + 's'}")
        return True

    def info(self) -> bool:
        self.say(cli.format_info(cli.dataset_info(self.data_dir)))
        return True

    def results(self) -> bool:
        cli.report(self.output_dir, log=self.say)
        return True

    def train(self, choice: str) -> bool:
        run_stages = MENU[choice][1]
        values = {**vars(self.config), "data_dir": str(self.data_dir), "profile": self.profile,
                  "base_model": self.base_model,
                  "output_dir": str(self.output_dir / "_".join(run_stages) if choice != "5" else self.output_dir),
                  "skip": [s for s in STAGES if s not in run_stages]}
        cli.train(PipelineConfig(**values), log=self.say)
        return True

    def run(self) -> int:
        while True:
            choice = self.choose(f"APT launcher (profile {self.profile}, data {self.data_dir})", MENU)
            if choice in (None, "q"):
                return 0
            actions = {"1": self.prepare, "6": self.info, "7": self.results, "8": self.settings}
            try:
                going = actions[choice]() if choice in actions else self.train(choice)
            except ERRORS as e:
                self.say(f"error: {str(e).strip(chr(34))}")
                going = True
            if not going:
                self.say()
                return 0


def launch(data_dir=None, output_dir=None, stdin=None, stdout=None, config: PipelineConfig | None = None,
           profile: str | None = None, base_model: str | None = None) -> int:
    """Show the menu, read choices until ``q`` or end of input. ``config``: budgets for the training entries;
    ``profile`` and ``base_model``: the training entries' starting point (entry 8 changes them)."""
    return Session(data_dir, output_dir, stdin, stdout, config, profile, base_model).run()
