"""Find the images of a folder most similar to your query images, with a trained checkpoint.

python search.py --checkpoint best.pt --gallery DIR --query a.jpg [b.jpg ...] [--top 10]
    [--mode sa|glca|sa+glca] [--index F] [--picture out.png] [--csv out.csv] [--batch-size N] [--device auto]

The gallery (.jpg/.jpeg/.png/.webp files under DIR, recursively) is embedded once into an index
file, DIR/.dcal_index.npz unless --index is given; later calls embed only new or changed files
and start over when the checkpoint changes. A Re-ID checkpoint ranks by its retrieval embedding,
an FGVC one by its pre-logit features ("find similar"); similarity is cosine. Files that cannot
be read are reported and skipped. Exit code 1 when nothing could be searched.
"""

from __future__ import annotations

import argparse
import sys

from dual_cross_attention.cli import configure_logging, failure_status, script_parser
from dual_cross_attention.errors import DcalError, UsageError
from dual_cross_attention.inference import check_mode
from dual_cross_attention.models import PREDICT_MODES
from dual_cross_attention.prediction import find_images, load_trained
from dual_cross_attention.search_index import (
    draw_search,
    format_results,
    results_frame,
    search_files,
    update_index,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="last.pt or best.pt written by train.py")
    parser.add_argument("--gallery", required=True, help="the folder of images to search")
    parser.add_argument(
        "--query", nargs="+", required=True, metavar="IMAGE", help="query images (or folders)"
    )
    parser.add_argument("--top", type=int, default=10, help="matches reported per query (default 10)")
    parser.add_argument(
        "--mode", choices=PREDICT_MODES, help="the embedding that ranks (default sa+glca, sa without GLCA)"
    )
    parser.add_argument("--index", help="the index file (default: GALLERY/.dcal_index.npz)")
    parser.add_argument("--picture", help="draw each query and its matches into this PNG")
    parser.add_argument("--csv", help="also write query, rank, path, similarity to this CSV file")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the checkpoint's train.device)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for log files)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    overrides = [f"train.device={args.device}"] if args.device else []
    try:
        if args.top < 1 or args.batch_size < 1:
            raise UsageError(f"--top and --batch-size must be >= 1, got {args.top} and {args.batch_size}")
        trained = load_trained(args.checkpoint, overrides)
        mode = args.mode or ("sa+glca" if "sa+glca" in trained.modes else "sa")
        check_mode(mode, trained.modes)  # before embedding a whole gallery
        index, report = update_index(
            trained, args.gallery, args.index, args.batch_size, show_progress=not args.no_progress
        )
        queries, skipped = find_images(args.query)
        results, unreadable = search_files(
            trained, index, args.gallery, queries, mode, args.top, args.batch_size
        )
    except (DcalError, KeyboardInterrupt) as err:
        return failure_status(err, "the previous index, if any, is unchanged")
    print(report.summary())
    print(format_results(results, skipped + unreadable, report.skipped))
    if not results:
        reason = "no gallery image could be embedded" if not len(index) else "no query image could be read"
        print(f"error: nothing was searched: {reason}", file=sys.stderr)
        return 1
    if args.csv:
        results_frame(results).to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    if args.picture:
        caption = f"{args.checkpoint}: {mode} embedding, cosine similarity"
        print(f"wrote {draw_search(results, args.picture, caption)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
