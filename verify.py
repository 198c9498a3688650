"""Verify: do two images show the same identity? Cosine similarity of a checkpoint's embeddings.

python verify.py --checkpoint best.pt A.jpg B.jpg [--threshold T] [--mode sa+glca] [--picture out.png]
python verify.py --checkpoint best.pt --pairs PAIRS.csv [--root DIR] [--csv OUT.csv] [--threshold T]

Prints the similarity per mode (sa, glca, sa+glca) and the decision of --mode: "same" when the
cosine is >= the threshold, which is --threshold T or the one the checkpoint stores (chosen on
validation pairs in training, data.val_fraction > 0); without either the decision is unknown.
--picture draws both images side by side with their attention rollout and the patches GLCA
picked. PAIRS.csv: path_a,path_b[,same], paths relative to --root (default: the checkpoint's
data.root). Unreadable files are reported and skipped. Exit code 1 when no pair could be scored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dual_cross_attention.cli import configure_logging, failure_status, script_parser
from dual_cross_attention.errors import DcalError, UsageError
from dual_cross_attention.inference import check_mode
from dual_cross_attention.models import PREDICT_MODES
from dual_cross_attention.prediction import load_trained
from dual_cross_attention.verification.checkpoint_pairs import stored_verification
from dual_cross_attention.verification.pairs import read_pair_list
from dual_cross_attention.verification.verify_files import (
    decisions_frame,
    draw_pair,
    format_many,
    format_single,
    resolve_threshold,
    verify_pairs,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="last.pt or best.pt written by train.py")
    parser.add_argument("images", nargs="*", metavar="IMAGE", help="the two images of one pair")
    parser.add_argument("--pairs", metavar="PAIRS.csv", help="many pairs: path_a,path_b[,same]")
    parser.add_argument("--root", help="folder the --pairs paths are relative to (default: data.root)")
    parser.add_argument("--threshold", type=float, help="decide at this cosine (default: the stored one)")
    parser.add_argument("--mode", choices=PREDICT_MODES, default="sa+glca", help="the mode that decides")
    parser.add_argument("--picture", metavar="OUT.png", help="draw the pair with rollout and GLCA patches")
    parser.add_argument("--csv", help="also write the scores and decisions to this CSV file")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the checkpoint's train.device)")
    args = parser.parse_args(argv)
    if not ((args.pairs and not args.images) or (not args.pairs and len(args.images) == 2)):
        parser.error("give two images, or --pairs PAIRS.csv")
    if args.picture and args.pairs:
        parser.error("--picture draws one pair: give two images, not --pairs")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    overrides = [f"train.device={args.device}"] if args.device else []
    try:
        trained = load_trained(args.checkpoint, overrides)
        check_mode(args.mode, trained.modes)
        if args.pairs:
            root = Path(args.root or trained.config.data.root)
            pairs = [(root / a, root / b, same) for a, b, same in read_pair_list(args.pairs)]
        else:
            pairs = [(Path(args.images[0]), Path(args.images[1]), None)]
        threshold = resolve_threshold(trained, args.mode, args.threshold)
        scored, skipped = verify_pairs(trained, pairs, args.batch_size)
        if not scored:
            print(format_many(scored, threshold, skipped, len(pairs)))
            raise UsageError("no pair could be scored: every pair holds an unreadable file")
        if args.pairs:
            print(format_many(scored, threshold, skipped, len(pairs)))
        else:
            print(format_single(scored[0], threshold, stored_verification(trained)[0]))
        if args.picture:
            print(f"wrote {draw_pair(trained, scored[0], threshold, args.picture)}")
    except (DcalError, KeyboardInterrupt) as err:
        return failure_status(err)
    if args.csv:
        decisions_frame(scored, threshold).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
