"""Cost of DCAL relative to the plain timm ViT.

Training (DeiT-Tiny at 448 px, ViT-Base at 224): the ratios DCAL / plain ViT of training-step
FLOPs (math SDPA backend), bytes saved for backward (default backend), DCAL's saved bytes with
activation checkpointing over those without, CPU wall time of a full optimizer step (median), and
inference FLOPs (SA+GLCA). The counts are ``diagnostics.cost.measure_costs``, the ones
``test_fixes.py`` checks; only the wall time is measured here.

Inference (both at 448 px): SA+GLCA FLOPs over the plain ViT's and images/s of the SA+GLCA
forward (no_grad, eval) over the plain ViT's, median seconds per forward, models alternating.

    python benchmarks/bench_model.py                   # both tables
    python benchmarks/bench_model.py --part inference  # inference only
    python benchmarks/bench_model.py --steps 3         # fewer timed steps
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from dual_cross_attention.diagnostics import memory
from dual_cross_attention.diagnostics.cost import (
    count_flops,
    dcal_loss,
    measure_costs,
    plain_loss,
    plain_vit_like,
)
from dual_cross_attention.models import DualViT

CONFIGS = [("deit_tiny_patch16_224", 448), ("vit_base_patch16_224", 224)]
INFERENCE_CONFIGS = [("deit_tiny_patch16_224", 448), ("vit_base_patch16_224", 448)]
TARGETS = {  # the bounds test_fixes.py checks, and a CPU step-time bound of this benchmark's own
    "train_flops": memory.TRAIN_FLOPS_MAX,
    "saved_bytes": memory.SAVED_BYTES_MAX,
    "checkpointed": memory.CHECKPOINTED_MAX,
    "wall_time": 2.4,
    "inference_flops": memory.INFERENCE_FLOPS_MAX,
}
INFERENCE_SPEED_MIN = 0.85  # SA+GLCA images/s over the plain ViT's (issue 16)


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


def forward_seconds(nets: list[nn.Module], images: torch.Tensor, steps: int) -> list[float]:
    """Median wall time of one no-grad eval forward for each model, after one untimed warm-up;
    the models take turns as in ``step_seconds``."""
    times: list[list[float]] = [[] for _ in nets]
    with torch.no_grad():
        for i in range(steps + 1):
            for net, record in zip(nets, times, strict=True):
                start = time.perf_counter()
                net(images)
                if i:
                    record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def bench_inference(name: str, img_size: int, batch: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = DualViT(name, num_classes=200, img_size=img_size, pretrained=False).eval()
    plain = plain_vit_like(model).eval()
    images = torch.randn(batch, 3, img_size, img_size)
    with torch.no_grad():
        flops = count_flops(lambda: model(images)) / count_flops(lambda: plain(images))
    dcal_time, plain_time = forward_seconds([model, plain], images, steps)
    return {
        "inference_flops": flops,
        "speed": plain_time / dcal_time,
        "dcal_ips": batch / dcal_time,
        "plain_ips": batch / plain_time,
    }


def train_table(batch: int, steps: int) -> list[str]:
    """Prints the training table; returns the configurations over a target."""
    columns = ["model", "px", "train FLOPs", "saved bytes", "ckpt / no ckpt", "step time", "infer FLOPs"]
    print("| " + " | ".join(columns + ["DCAL / ViT step"]) + " |")
    print("|---" * (len(columns) + 1) + "|")
    failed = []
    for name, size in CONFIGS:
        r = bench(name, size, batch, steps)
        cells = []
        for key in ("train_flops", "saved_bytes", "checkpointed", "wall_time", "inference_flops"):
            ok = r[key] <= TARGETS[key]
            failed += [] if ok else [f"{name}@{size} {key}"]
            cells.append(f"{r[key]:.2f}x{'' if ok else ' (over ' + str(TARGETS[key]) + ')'}")
        step = f"{r['dcal_step_s']:.2f} s / {r['plain_step_s']:.2f} s"
        print(f"| {name} | {size} | " + " | ".join(cells) + f" | {step} |")
    print("targets: " + ", ".join(f"{k} <= {v}x" for k, v in TARGETS.items()))
    return failed


def inference_table(batch: int, steps: int) -> list[str]:
    """Prints the inference table; returns the configurations over a target."""
    print(f"| model | px | infer FLOPs | SA+GLCA / ViT images/s | images/s (batch {batch}) |")
    print("|---|---|---|---|---|")
    failed = []
    for name, size in INFERENCE_CONFIGS:
        r = bench_inference(name, size, batch, steps)
        flops_ok = r["inference_flops"] <= TARGETS["inference_flops"]
        speed_ok = r["speed"] >= INFERENCE_SPEED_MIN
        failed += [] if flops_ok else [f"{name}@{size} inference_flops"]
        failed += [] if speed_ok else [f"{name}@{size} inference_speed"]
        flops = f"{r['inference_flops']:.2f}x" + ("" if flops_ok else f" (over {TARGETS['inference_flops']})")
        speed = f"{r['speed']:.2f}x" + ("" if speed_ok else f" (under {INFERENCE_SPEED_MIN})")
        rates = f"{r['dcal_ips']:.2f} / {r['plain_ips']:.2f}"
        print(f"| {name} | {size} | {flops} | {speed} | {rates} |")
    bounds = f"inference_flops <= {TARGETS['inference_flops']}x, inference_speed >= {INFERENCE_SPEED_MIN}x"
    print(f"targets: {bounds}")
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=2, help="training batch")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per model")
    parser.add_argument("--infer-batch", type=int, default=4)
    parser.add_argument("--infer-steps", type=int, default=5, help="timed forwards per model")
    parser.add_argument("--part", choices=("all", "train", "inference"), default="all")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    failed = []
    if args.part in ("all", "train"):
        failed += train_table(args.batch, args.steps)
    if args.part in ("all", "inference"):
        failed += inference_table(args.infer_batch, args.infer_steps)
    print("all within targets" if not failed else f"over target: {failed}")


if __name__ == "__main__":
    main()
