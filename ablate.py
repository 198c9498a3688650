"""Ablate DCAL: train named variants x seeds as ordinary runs and write one table over them.

python ablate.py --config configs/demo_hard.yaml --variants sa glca pwca dcal --seeds 0 1 2
                 [--set section.key=value ...] [--name NAME] [--list]

Runs go to runs/<name>/<variant>_s<seed>/ (name: --name, else ablation.name, else the config's
stem); the table to runs/<name>/ablation.{csv,md,png}. Rerunning the command skips finished
runs and continues interrupted ones.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from dual_cross_attention.ablation import BUILTIN_VARIANTS, ablation_name, known_variants, run_ablation
from dual_cross_attention.cli import add_overrides, configure_logging, failure_status, script_parser
from dual_cross_attention.config import load_config, parse_override
from dual_cross_attention.distributed import cleanup
from dual_cross_attention.errors import DcalError, UsageError

SET_BY_ABLATION = {"train.seed": "--seeds", "run.name": "--name"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--config", required=True, help="experiment YAML, e.g. configs/demo_hard.yaml")
    parser.add_argument(
        "--variants", nargs="+", default=["sa", "glca", "pwca", "dcal"], metavar="NAME",
        help=f"variants to run (default: sa glca pwca dcal); built in: {' '.join(BUILTIN_VARIANTS)}, "
        "plus the config's ablation.variants",
    )  # fmt: skip
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED", help="train.seed of each run"
    )
    add_overrides(parser, "override config keys for every run, e.g. --set train.epochs=8")
    parser.add_argument("--name", default=None, help="directory under run.output_dir (default: config stem)")
    parser.add_argument("--list", action="store_true", help="print the known variants and exit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    command = shlex.join(["python", "ablate.py", *(sys.argv[1:] if argv is None else argv)])
    try:
        for text in args.overrides:
            key = parse_override(text)[0]
            if key in SET_BY_ABLATION:
                raise UsageError(f"--set {text}: ablate.py sets {key} itself; use {SET_BY_ABLATION[key]}")
        base = load_config(args.config, args.overrides)
        if args.list:
            for name, overrides in known_variants(base.ablation.variants).items():
                print(f"{name}: {overrides}")
            return 0
        name = ablation_name(base, args.name, args.config)
        report = run_ablation(base, args.variants, args.seeds, name, not args.no_progress, command)
    except (DcalError, KeyboardInterrupt) as err:
        return failure_status(err, "finished epochs are kept; rerun the same command to continue")
    finally:
        cleanup()
    if report is not None:  # rank 0 reports
        print(report.markdown)
        print(f"written: {report.out_dir}/ablation.csv, ablation.md, ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
