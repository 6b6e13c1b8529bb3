"""Command line: ``python -m apt_course run | report | build-checkpoints``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apt_course", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="print every recorded chapter's figures as one table")
    rep.add_argument("--dir", default=None, help="results folder (default: results/ of the checkout)")
    run = sub.add_parser("run", help="execute notebooks (all, or those named like ch00 ch04) and print the results")
    run.add_argument("chapters", nargs="*", help="notebook name prefixes, e.g. ch00 ch04 (default: all)")
    run.add_argument("--seed", type=int, default=None, help="override SEED")
    run.add_argument("--profile", default=None, help="override PROFILE (tiny or gpu)")
    run.add_argument("--out", default=None, help="folder for executed copies (default: runs/)")
    build = sub.add_parser("build-checkpoints", help="rebuild the shipped tiny checkpoints in data/checkpoints")
    build.add_argument("--only", nargs="*", default=None, help="names to build (default: all)")
    build.add_argument("--out", default=None, help="folder (default: data/checkpoints of the checkout)")
    args = parser.parse_args(argv)

    if args.command == "report":
        from .results import format_report, load_results

        print(format_report(load_results(args.dir)))
    elif args.command == "run":
        from .results import format_report, load_results
        from .runner import run as run_notebooks

        params = {k: v for k, v in (("SEED", args.seed), ("PROFILE", args.profile)) if v is not None}
        if args.profile:
            from .profiles import get_profile

            get_profile(args.profile)  # fail early on an unknown profile
        run_notebooks(args.chapters, params, args.out)
        print(format_report(load_results()))
    elif args.command == "build-checkpoints":
        from .checkpoints import build_all
        from .utils import set_cpu_threads

        set_cpu_threads()

        build_all(names=args.only, out=args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
