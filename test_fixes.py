"""Check on this machine that the known failure modes of DCAL training are fixed.

python test_fixes.py [--config configs/cub_vit_base.yaml] [--device cuda|cpu] [--quick]

Prints one line per check: PASS, FAIL or SKIP, the measured value and the expected one. Exit
code 0 when nothing failed, 1 when a check failed, 2 when the config or device is unusable.
The checks, in order:
  1 lr         the config's LR rule (sqrt: 5e-4 at effective batch 16; linear: 1.5625e-5),
               warmup that starts low and peaks at its end, cosine that ends at min_lr
  2 memory     FLOPs and bytes saved for backward of a DCAL step over the plain ViT,
               checkpointing, nothing kept across 20 training steps, and on CUDA the peak
               memory of the configured physical batch against the device's memory
  3 learning   a short demo training: accuracy rises, loss stays finite, no branch collapses
  4 weighting  the uncertainty loss weights move apart when the branch losses differ
  5 branches   GLCA/PWCA: rollout rows, top-R tokens, gradients, PWCA in training only,
               the identity-pair invariant

Without --config the checks use the demo config (configs/demo.yaml: a small ViT on the
built-in demo data); README gives the times measured on a 2-core CPU. With --config they use
that config's backbone without loading weights; on a CPU its cost ratios are measured at 1 and
2 blocks and extrapolated to the full depth, and the 20-step and GLCA/PWCA checks run at 2
blocks and at most 224 px; the lines say so. The learning check always trains the demo model.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from dual_cross_attention.config import load_config
from dual_cross_attention.diagnostics.result import format_result
from dual_cross_attention.diagnostics.suite import run_checks
from dual_cross_attention.errors import DcalError
from dual_cross_attention.runtime import resolve_device

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=None, help="experiment YAML to check (default: the demo config)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="where models run (default: auto)"
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="skip check 3, the short demo training (most of the run time); its lines print as SKIP",
    )  # fmt: skip
    parser.add_argument(
        "--verbose", action="store_true", help="also print the package's log (progress, warnings)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler()
    handler.setLevel(logging.INFO if args.verbose else logging.ERROR)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    try:
        cfg = load_config(args.config or DEMO_CONFIG)
        demo_cfg = load_config(DEMO_CONFIG)
        device = resolve_device(args.device)
    except DcalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    reduce = device.type == "cpu" and args.config is not None
    print(f"checking {args.config or 'the demo config'} on {device}{' (--quick)' if args.quick else ''}")
    start = time.perf_counter()
    failed = 0
    try:
        for result in run_checks(cfg, demo_cfg, device, quick=args.quick, reduce=reduce):
            print(format_result(result), flush=True)
            failed += result.passed is False
    except KeyboardInterrupt:
        print("interrupted: the checks above ran, the rest did not", file=sys.stderr)
        return 130
    verdict = f"{failed} check(s) FAILED" if failed else "all checks passed"
    print(f"{verdict} in {time.perf_counter() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
