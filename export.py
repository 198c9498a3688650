"""Export a trained checkpoint for deployment, with a parity check against PyTorch.

python export.py --checkpoint runs/<name>/checkpoints/best.pt --format onnx|torchscript|exported
    --out model.onnx [--mode sa|glca|sa+glca] [--embedding | --probabilities]

The exported model takes float32 RGB in [0, 1], (N, 3, H, W) at the checkpoint's image size, with
any batch size N, and normalises inside the graph. It returns class probabilities of the mode
(FGVC; sa+glca: the mean of the two softmax outputs, as predict.py) or the retrieval embedding
(--embedding, the default for Re-ID checkpoints). model.json next to --out says how to resize
an image before feeding it, what the graph holds, the class names, and the source checkpoint's
sha256. onnx needs the export extra: pip install '.[export]'.

Every export is checked: generated images through PyTorch and through the artefact (onnxruntime
for onnx) must agree to 1e-4 (max abs difference) with the same top-1 class; otherwise the
artefact is removed and the exit code is 1.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dual_cross_attention.cli import configure_logging, failure_status, script_parser
from dual_cross_attention.errors import DcalError
from dual_cross_attention.exporting import FORMATS, export_checkpoint
from dual_cross_attention.models import PREDICT_MODES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="last.pt or best.pt written by train.py")
    parser.add_argument("--format", required=True, choices=FORMATS, help="exported: torch.export (.pt2)")
    parser.add_argument(
        "--out", required=True, help="the artefact, e.g. model.onnx; the sidecar is model.json"
    )
    parser.add_argument(
        "--mode", choices=PREDICT_MODES, help="inference mode (default sa+glca, or sa without GLCA)"
    )
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--embedding",
        action="store_true",
        default=None,
        help="output the retrieval embedding (Re-ID default)",
    )
    output.add_argument(
        "--probabilities",
        dest="embedding",
        action="store_false",
        help="output class probabilities (FGVC default)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    for name in ("onnxscript", "onnx_ir"):  # the ONNX exporter logs every rewrite at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        result = export_checkpoint(args.checkpoint, args.format, args.out, args.mode, args.embedding)
    except (DcalError, KeyboardInterrupt) as err:
        return failure_status(err, "no model was written")
    p = result.parity
    top1 = "" if p.top1_agree is None else f", top-1 agrees on {p.top1_agree}/{p.images} images"
    batches = ", ".join(map(str, p.batch_sizes))
    print(
        f"parity: max abs difference {p.max_abs_difference:.3g} (allowed {p.tolerance:g}){top1}, "
        f"batch sizes {batches}"
    )
    print(f"wrote {result.artifact} and {result.sidecar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
