"""Cost of DCAL relative to the plain timm ViT.

Prints, per configuration, the ratios DCAL / plain ViT of: training-step FLOPs (math SDPA
backend), bytes saved for backward (default backend), DCAL's saved bytes with activation
checkpointing over those without, CPU wall time of a full optimizer step (median), and inference
FLOPs (SA+GLCA). The counts are ``diagnostics.cost.measure_costs``, the ones ``test_fixes.py``
checks; only the wall time is measured here.

    python benchmarks/bench_model.py            # deit_tiny @448 and vit_base @224, batch 2
    python benchmarks/bench_model.py --steps 3  # fewer timed steps
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from dual_cross_attention.diagnostics import memory
from dual_cross_attention.diagnostics.cost import dcal_loss, measure_costs, plain_loss, plain_vit_like
from dual_cross_attention.models import DualViT

CONFIGS = [("deit_tiny_patch16_224", 448), ("vit_base_patch16_224", 224)]
TARGETS = {  # the bounds test_fixes.py checks, and a CPU step-time bound of this benchmark's own
    "train_flops": memory.TRAIN_FLOPS_MAX,
    "saved_bytes": memory.SAVED_BYTES_MAX,
    "checkpointed": memory.CHECKPOINTED_MAX,
    "wall_time": 2.7,
    "inference_flops": memory.INFERENCE_FLOPS_MAX,
}


def step_seconds(
    nets: list[tuple[nn.Module, Callable]], images: torch.Tensor, labels: torch.Tensor, steps: int
) -> list[float]:
    """Median wall time of forward + backward + AdamW step for each (model, loss) pair, after one
    untimed warm-up step. The models take turns step by step, so drifts in machine load hit all alike."""
    optimizers = [torch.optim.AdamW(net.parameters(), lr=1e-4) for net, _ in nets]
    times: list[list[float]] = [[] for _ in nets]
    for i in range(steps + 1):
        for (net, loss_fn), optimizer, record in zip(nets, optimizers, times, strict=True):
            net.train()
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss_fn(net, images, labels).backward()
            optimizer.step()
            if i:
                record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def bench(name: str, img_size: int, batch: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = DualViT(name, num_classes=200, img_size=img_size, pretrained=False)
    images = torch.randn(batch, 3, img_size, img_size)
    labels = torch.randint(0, 200, (batch,))
    costs = measure_costs(model, images, labels)
    plain = plain_vit_like(model)
    dcal_time, plain_time = step_seconds([(model, dcal_loss), (plain, plain_loss)], images, labels, steps)
    return {
        **costs.ratios(),
        "wall_time": dcal_time / plain_time,
        "dcal_step_s": dcal_time,
        "plain_step_s": plain_time,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per model")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    columns = ["model", "px", "train FLOPs", "saved bytes", "ckpt / no ckpt", "step time", "infer FLOPs"]
    print("| " + " | ".join(columns + ["DCAL / ViT step"]) + " |")
    print("|---" * (len(columns) + 1) + "|")
    failed = []
    for name, size in CONFIGS:
        r = bench(name, size, args.batch, args.steps)
        cells = []
        for key in ("train_flops", "saved_bytes", "checkpointed", "wall_time", "inference_flops"):
            ok = r[key] <= TARGETS[key]
            failed += [] if ok else [f"{name}@{size} {key}"]
            cells.append(f"{r[key]:.2f}x{'' if ok else ' (over ' + str(TARGETS[key]) + ')'}")
        step = f"{r['dcal_step_s']:.2f} s / {r['plain_step_s']:.2f} s"
        print(f"| {name} | {size} | " + " | ".join(cells) + f" | {step} |")
    print("targets: " + ", ".join(f"{k} <= {v}x" for k, v in TARGETS.items()))
    print("all within targets" if not failed else f"over target: {failed}")


if __name__ == "__main__":
    main()
