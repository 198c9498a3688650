"""Evaluate a checkpoint: top-1, top-5 and mean per-class accuracy of sa, glca and sa+glca; for
a Re-ID checkpoint, mAP, CMC rank-1/5/10 and mINP of query against gallery.

python evaluate.py --checkpoint runs/<name>/checkpoints/best.pt [--split test] [--set k=v ...]
    [--json OUT.json] [--out DIR] [--visualize N] [--tta flip]
python evaluate.py --checkpoint runs/<reid run>/checkpoints/best.pt [--rerank] [--save-features F.npz]
    [--tta flip]
python evaluate.py --checkpoint best.pt --pairs [PAIRS.csv | IDS.json] [--val-pairs [VAL.csv | IDS.json]]

Pair verification (--pairs): a CSV path_a,path_b,same (paths relative to data.root), a JSON
{identity: [image paths]} to draw pairs from, or nothing: the run's generated test pairs. The
threshold is chosen on --val-pairs (nothing: the run's validation pairs), else the one stored in
the checkpoint; never on the measured pairs. Writes roc.png, scores.png, verification.json.

--tta (default: the checkpoint's eval.tta) averages over each image and its mirror: the FGVC
probabilities, the Re-ID (and pair) embeddings. The printed header and --json's "provenance"
record the code version, software, device, seed, config hash, dataset version, protocol, TTA
and how the checkpoint was chosen.

Writes per_class.csv, confusions.csv, confusion.png (and attention_grid.png with --visualize)
into --out, by default a folder next to the checkpoint (e.g. checkpoints/best_test/).
Several GPUs: torchrun --nproc_per_node=N evaluate.py ... (each image is counted exactly once).
"""

from __future__ import annotations

import argparse
import os
import sys

from dual_cross_attention.cli import add_overrides, configure_logging, failure_status, script_parser
from dual_cross_attention.distributed import cleanup
from dual_cross_attention.errors import DcalError
from dual_cross_attention.evaluation import evaluate_checkpoint, format_report, write_json
from dual_cross_attention.inference import TTA_CHOICES
from dual_cross_attention.verification.checkpoint_pairs import RUN_PAIRS


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
        "--visualize",
        type=int,
        default=0,
        metavar="N",
        help="attention pictures of N images (Re-ID: N queries with their top-10 matches, reid_matches.png)",
    )
    parser.add_argument(
        "--tta", choices=TTA_CHOICES, default=None,
        help="flip: average with the mirror image (FGVC probabilities, Re-ID embeddings); "
        "default: the checkpoint's eval.tta",
    )  # fmt: skip
    parser.add_argument(
        "--throughput-iters", type=int, default=5, metavar="N", help="timed batches per forward (0: skip)"
    )
    parser.add_argument("--rerank", action="store_true", help="Re-ID: k-reciprocal re-ranking")
    parser.add_argument(
        "--save-features", metavar="F.npz", help="Re-ID: write the query/gallery features that were ranked"
    )
    parser.add_argument(
        "--pairs", nargs="?", const=RUN_PAIRS, metavar="PAIRS.csv|IDS.json",
        help="verify pairs (no value: the run's generated test pairs)",
    )  # fmt: skip
    parser.add_argument(
        "--val-pairs", nargs="?", const=RUN_PAIRS, metavar="VAL.csv|IDS.json",
        help="choose the thresholds on these pairs (no value: the run's validation pairs)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for log files)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    try:
        report = evaluate_checkpoint(
            args.checkpoint, split=args.split, overrides=args.overrides, out_dir=args.out,
            visualize=args.visualize, tta=args.tta, throughput_iterations=args.throughput_iters,
            show_progress=not args.no_progress, rerank=args.rerank, save_features=args.save_features,
            pairs=args.pairs, val_pairs=args.val_pairs,
        )  # fmt: skip
    except (DcalError, KeyboardInterrupt) as err:
        return failure_status(err, "nothing was written")
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
