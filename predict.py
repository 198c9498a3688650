"""Predict the classes of your own images with a trained checkpoint.

python predict.py --checkpoint best.pt IMAGES_OR_DIRS... [--top-k 5] [--mode sa+glca] [--csv OUT.csv]

Folders are searched recursively for .jpg/.jpeg/.png/.webp files. Files that cannot be read are
reported and skipped. Probabilities sum to one per image (sa+glca: the mean of the two softmax
outputs). Exit code 1 when nothing could be predicted.
"""

from __future__ import annotations

import argparse
import sys

from dual_cross_attention.cli import configure_logging, failure_status, script_parser
from dual_cross_attention.errors import DcalError
from dual_cross_attention.inference import TTA_CHOICES
from dual_cross_attention.models import PREDICT_MODES
from dual_cross_attention.prediction import (
    find_images,
    format_predictions,
    load_trained,
    predict_files,
    predictions_frame,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="last.pt or best.pt written by train.py")
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and/or folders")
    parser.add_argument("--top-k", type=int, default=5, help="classes reported per image (default 5)")
    parser.add_argument("--mode", choices=PREDICT_MODES, default="sa+glca", help="inference mode")
    parser.add_argument(
        "--tta", choices=TTA_CHOICES, default=None,
        help="flip: average with the mirror image (default: the checkpoint's eval.tta)",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the checkpoint's train.device)")
    parser.add_argument("--csv", help="also write path, class_1, prob_1, ... to this CSV file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    overrides = [f"train.device={args.device}"] if args.device else []
    try:
        trained = load_trained(args.checkpoint, overrides)
        paths, skipped = find_images(args.inputs)
        predictions, unreadable = predict_files(
            trained, paths, mode=args.mode, top_k=args.top_k, batch_size=args.batch_size, tta=args.tta
        )
    except (DcalError, KeyboardInterrupt) as err:
        return failure_status(err, "no predictions were written")
    print(format_predictions(predictions, skipped + unreadable))
    if args.csv and predictions:
        predictions_frame(predictions).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    if not predictions:
        print("error: no image could be predicted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
