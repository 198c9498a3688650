"""Train DCAL. With no arguments it trains the built-in demo on whatever device is present.

python train.py [--config configs/demo.yaml] [--set section.key=value ...] [--resume auto|PATH]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from dual_cross_attention.cli import add_overrides, configure_logging, script_parser
from dual_cross_attention.config import load_config
from dual_cross_attention.distributed import cleanup
from dual_cross_attention.errors import DcalError
from dual_cross_attention.lr_finder import LRFindResult, find_lr
from dual_cross_attention.trainer import train

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="experiment YAML (default: the demo)")
    add_overrides(parser, "override config keys, e.g. --set train.batch_size=4 model.pwca=false")
    parser.add_argument("--resume", default=None, help="'auto' (this run's last.pt) or a checkpoint path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")
    parser.add_argument(
        "--lr-find", action="store_true",
        help="run the LR range test (settings in the lr_find section) instead of training",
    )  # fmt: skip
    return parser.parse_args(argv)


def report_lr_find(result: LRFindResult, config_lr: float, rule: str) -> int:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"LR range test: {len(result.lrs)} steps, {result.reason}")
        print(f"suggested LR (steepest descent of the smoothed loss): {result.steepest_lr:.3g}")
        print(f"suggested LR (minimum of the smoothed loss / 10):     {result.min_over_10_lr:.3g}")
        print(f"the config would use: {config_lr:.3g} ({rule})")
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster pre-empting the job), handled like Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments with --resume auto."""
    args, skip = [], False
    for arg in argv:
        if skip or arg.startswith("--resume="):
            skip = False
            continue
        if arg == "--resume":
            skip = True
            continue
        args.append(arg)
    return " ".join(["python train.py", *args, "--resume auto"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    signal.signal(signal.SIGTERM, _terminate)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.lr_find:
            return report_lr_find(*find_lr(cfg))
        result = train(cfg, resume=args.resume, show_progress=not args.no_progress)
    except DcalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        terminated = isinstance(interrupt, Terminated)
        print(
            f"{'terminated (SIGTERM)' if terminated else 'interrupted'}: checkpoints/last.pt holds the last "
            f"completed epoch; continue with: {resume_command(sys.argv[1:] if argv is None else argv)}",
            file=sys.stderr,
        )
        return 143 if terminated else 130
    finally:
        cleanup()
    if not result.history:  # not rank 0 under torchrun (rank 0 reports), or nothing left to train
        return 0
    last = result.history[-1]
    key, name = ("mAP", "mAP") if "eval_mAP_sa" in last else ("top1", "top-1")
    selected = {"auc": "validation pair AUC", "top1": "rank-1" if key == "mAP" else "top-1", "mAP": "mAP"}
    best = selected.get(cfg.train.select_metric, name)
    value = f"{result.best_metric:.4f}" if cfg.train.select_metric == "auc" else f"{result.best_metric:.2f}%"
    print(f"run {result.run_dir}: {result.epochs_done} epochs, best {best} {value}")
    print(
        f"last epoch: {name} sa {last[f'eval_{key}_sa']:.2f}%, glca {last[f'eval_{key}_glca']:.2f}%, "
        f"sa+glca {last[f'eval_{key}_sa_glca']:.2f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
