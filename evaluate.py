"""Evaluate a checkpoint: top-1, top-5 and mean per-class accuracy of sa, glca and sa+glca.

python evaluate.py --checkpoint runs/<name>/checkpoints/best.pt [--split test] [--set k=v ...]
    [--json OUT.json] [--out DIR] [--visualize N] [--tta flip]

Writes per_class.csv, confusions.csv, confusion.png (and attention_grid.png with --visualize)
into --out, by default a folder next to the checkpoint (e.g. checkpoints/best_test/).
Several GPUs: torchrun --nproc_per_node=N evaluate.py ... (each image is counted exactly once).
"""

from __future__ import annotations

import argparse
import os
import sys

from dual_cross_attention.cli import add_overrides, configure_logging, script_parser
from dual_cross_attention.distributed import cleanup
from dual_cross_attention.errors import DcalError
from dual_cross_attention.evaluation import evaluate_checkpoint, format_report, write_json
from dual_cross_attention.inference import TTA_CHOICES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="last.pt or best.pt written by train.py")
    parser.add_argument("--split", default="test", help="test (default), val or train")
    add_overrides(
        parser, "override the checkpoint's config, e.g. --set data.root=/data/CUB_200_2011 train.device=cpu"
    )
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    parser.add_argument("--out", help="folder for the tables and pictures (default: next to the checkpoint)")
    parser.add_argument(
        "--visualize", type=int, default=0, metavar="N", help="attention pictures of N images"
    )
    parser.add_argument(
        "--tta", choices=TTA_CHOICES, default="none", help="flip: average with the mirror image"
    )
    parser.add_argument(
        "--throughput-iters", type=int, default=5, metavar="N", help="timed batches per forward (0: skip)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for log files)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    try:
        report = evaluate_checkpoint(
            args.checkpoint, split=args.split, overrides=args.overrides, out_dir=args.out,
            visualize=args.visualize, tta=args.tta, throughput_iterations=args.throughput_iters,
            show_progress=not args.no_progress,
        )  # fmt: skip
    except DcalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    finally:
        cleanup()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports for all
        return 0
    print(format_report(report))
    if args.json:
        print(f"wrote {write_json(report.results, args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
