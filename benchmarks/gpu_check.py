"""One command that checks dcal on a CUDA GPU: environment, correctness, speed and memory, fit.

    python benchmarks/gpu_check.py --out gpu_check/                    # all sections
    python benchmarks/gpu_check.py --out gpu_check/ --quick            # fewer iterations, smaller searches
    python benchmarks/gpu_check.py --out gpu_check/ --sections env,speed --batch 16

Writes OUT/gpu_check.json and OUT/gpu_check.md (tables) after every section and every speed or fit
item, so a run stopped by a time limit leaves what it measured; prints progress to stdout; exits 1
when a correctness check fails or the correctness section cannot run. A failure in one section or
item is recorded and the others still run. Without CUDA it prints ``error: no CUDA device`` and
exits 1. Nothing new starts after ``--budget-s`` seconds (default 480); what is left is marked skipped.

Sections (``sections.<name>`` in the JSON, each with ``status`` and ``seconds``):

- ``env``: torch / CUDA / cuDNN / timm versions, the git commit, the GPU (name, memory, compute
  capability), and ``sdpa[backend][dtype]["hd24" | "hd64"]``: whether the flash, efficient, cudnn
  and math SDPA backends run forward + backward on (2, 3, 64, hd) q/k/v in fp32, bf16 and fp16
  ("ok" or the error's first line and the reason torch warned about).
- ``correctness``: ``checks`` (name, passed, measured, expected). The GPU against the CPU fp32
  result of the same weights and input (TF32 off), for two small DualViTs (head dims 24 and 64):
  SA/GLCA logits, rollout and the GLCA selection in eval mode with and without autograd
  (``forward``), fp32 training gradients (``gradients``); bf16 and fp16 (GradScaler) training
  steps give finite losses and a finite gradient on every parameter (``amp``); activation
  checkpointing gives the same gradients; ``demo``: ``train.py`` on the demo for 2 epochs,
  ``--resume auto`` to 3, ``evaluate.py`` on best.pt, in subprocesses (rc, seconds, stderr tail,
  the last metrics.csv row, evaluate.py's top-1; SKIP when albumentations & co. are not installed).
- ``speed``: DCAL against the plain timm ViT it drives (``model.backbone``) at 448 px, ViT-B/16 and
  DeiT-Tiny, bf16 autocast, AdamW. ``train`` rows (with and without activation checkpointing) and
  ``inference`` rows (SA+GLCA against the plain forward, eval, no_grad), each with ``dcal``,
  ``plain`` (step_ms, images_per_s, peak_allocated_mib, peak_reserved_mib) and ``ratio`` (DCAL /
  plain). The two models take turns step by step (median after warm-up); memory is measured with
  each model alone on the GPU, in a step after AdamW's state exists.
- ``fit``: ``searches``: the largest ViT-B/16 448 px DCAL training batch (PWCA, three-branch loss,
  backward, AdamW, bf16) whose step runs within 16 and 24 GiB, with and without checkpointing:
  doubling, then bisection, one step per probe, with the allocator capped by
  ``torch.cuda.set_per_process_memory_fraction`` at the limit minus ``--fit-margin-gib`` (what a
  real card's CUDA context takes outside the allocator).

The package and timm are imported only where models are built, so a machine without CUDA is told
so after importing torch alone. ``--device cpu`` (hidden, for debugging) runs every section with
tiny models on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("env", "correctness", "speed", "fit")
SCHEMA_VERSION = 1
GiB, MiB = 2**30, 2**20
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SDPA_BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}
SDPA_HEAD_DIMS = (24, 64)
BRANCHES = ("sa", "glca", "pwca")
NUM_CLASSES = 200  # speed and fit: a CUB-sized head
CORRECTNESS_CLASSES, CORRECTNESS_BATCH = 10, 4
RATIO_KEYS = ("step_ms", "peak_allocated_mib", "peak_reserved_mib")  # DCAL / plain
DEMO_RUN = "gpu_demo"
DEMO_OVERRIDES = ("data.num_workers=4",)  # the demo's single loader worker would starve a GPU
# What train.py / evaluate.py import beyond torch and timm; without them the demo is skipped, not failed.
DEMO_MODULES = ("albumentations", "pandas", "matplotlib", "yaml", "scipy", "tqdm", "safetensors")
STDERR_TAIL = 2000

# Tolerances of the correctness checks (fp32 on both sides, TF32 off).
LOGITS_TOL = 1e-3  # max |GPU - CPU| of SA / GLCA logits
ROLLOUT_TOL = 1e-5  # max |GPU - CPU| of the rollout row (its values are about 1 / patches)
TIE_TOL = 1e-5  # a patch whose rollout is this close to the k-th largest may swap in or out of top-k
GRAD_REL_TOL = 1e-3  # max |g_gpu - g_cpu| / max |g_cpu| over all parameters
CHECKPOINT_REL_TOL = 1e-4  # the same, checkpointed against not (one device; atomics in attention backward)
AMP_LOSS_REL_TOL = 2e-2  # |bf16 or fp16 loss - fp32 loss| / |fp32 loss| at the same weights
DEMO_MIN_TOP1 = 20.0  # percent, sa+glca after the demo's last epoch (chance: 10)

_START = time.monotonic()


def log(message: str) -> None:
    print(f"[gpu_check {time.monotonic() - _START:6.1f}s] {message}", flush=True)


@dataclass(frozen=True)
class ModelSpec:
    name: str  # short, for check names and tables
    backbone: str
    img_size: int
    backbone_kwargs: dict | None = None

    @property
    def label(self) -> str:
        return f"{self.name} @{self.img_size}px"

    @property
    def description(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in (self.backbone_kwargs or {}).items())
        return f"{self.backbone} @{self.img_size}px{extra}"


SPEED_MODELS = (
    ModelSpec("vit_base_patch16_224", "vit_base_patch16_224", 448),
    ModelSpec("deit_tiny_patch16_224", "deit_tiny_patch16_224", 448),
)
FIT_MODEL = SPEED_MODELS[0]
CORRECTNESS_MODELS = (  # 64 px, 8 px patches: 64 patches, of which GLCA picks 7
    ModelSpec(
        "hd24", "deit_tiny_patch16_224", 64, {"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 4}
    ),
    ModelSpec(
        "hd64", "deit_tiny_patch16_224", 64, {"patch_size": 8, "depth": 4}
    ),  # DeiT-Tiny's 192 / 3 heads
)
TINY = ModelSpec(
    "tiny", "deit_tiny_patch16_224", 32, {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
)


@dataclass(frozen=True)
class Plan:
    """What the sections run: sizes and counts (``make_plan``)."""

    correctness_models: tuple[ModelSpec, ...]
    speed_models: tuple[ModelSpec, ...]
    batch: int
    inference_batch: int
    warmup: int
    iters: int
    fit_model: ModelSpec
    fit_limits_gib: tuple[float, ...]
    fit_cap: int
    fit_margin_gib: float
    amp_steps: int
    demo: bool
    demo_epochs: tuple[int, int]  # the first run's epochs, then the total after --resume auto
    demo_overrides: tuple[str, ...]
    demo_min_top1: float | None
    script_timeout_s: float


@dataclass
class Context:
    plan: Plan
    device: torch.device
    out_dir: Path
    deadline: float  # time.monotonic() after which nothing new starts
    save: Callable[[], None]  # writes the report as it stands

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def expired(self) -> bool:
        return self.time_left() <= 0


# ----------------------------------------------------------------------------- command line


def parse_sections(text: str) -> tuple[str, ...]:
    """``fit,env`` -> the named sections in run order; an unknown name is an error listing the valid ones."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {unknown or [text]}; valid sections: {','.join(SECTIONS)}"
        )
    return tuple(name for name in SECTIONS if name in names)


def parse_limits(text: str) -> tuple[float, ...]:
    try:
        limits = tuple(sorted(float(value) for value in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GiB values like 16,24, got {text!r}") from None
    if min(limits) <= 0:
        raise argparse.ArgumentTypeError(f"memory limits must be positive, got {text!r}")
    return limits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", required=True, help="folder for gpu_check.json, gpu_check.md and the demo run"
    )
    parser.add_argument("--quick", action="store_true", help="fewer iterations, shorter demo, fit cap 64")
    parser.add_argument(
        "--sections", type=parse_sections, default=SECTIONS, metavar="LIST",
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )  # fmt: skip
    parser.add_argument("--batch", type=int, default=8, help="training batch of the speed section")
    parser.add_argument("--inference-batch", type=int, default=64, help="batch of the inference timing")
    parser.add_argument("--fit-limits", type=parse_limits, default=(16.0, 24.0), metavar="GIB,GIB")
    parser.add_argument("--fit-cap", type=int, default=None, help="largest batch tried (256; --quick 64)")
    parser.add_argument(
        "--fit-margin-gib", type=float, default=0.5,
        help="taken off each limit for the CUDA context, which lives outside the allocator",
    )  # fmt: skip
    parser.add_argument("--budget-s", type=float, default=480.0, help="start nothing new after this")
    # Debugging only: a smoke run of every code path with tiny models on the CPU.
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--skip-demo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--demo-set", nargs="+", default=[], metavar="KEY=VALUE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 2 or args.inference_batch < 1:
        parser.error("--batch must be >= 2 (PWCA pairs images within a batch) and --inference-batch >= 1")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    """Full and ``--quick`` sizes on a GPU; tiny models and counts for a ``--device cpu`` smoke run."""
    cpu = args.device == "cpu"
    quick = args.quick or cpu
    return Plan(
        correctness_models=(TINY,) if cpu else CORRECTNESS_MODELS,
        speed_models=(TINY,) if cpu else SPEED_MODELS,
        batch=2 if cpu else args.batch,
        inference_batch=4 if cpu else args.inference_batch,
        warmup=1 if cpu else 2 if quick else 3,
        iters=2 if cpu else 3 if quick else 10,
        fit_model=TINY if cpu else FIT_MODEL,
        fit_limits_gib=args.fit_limits[:1] if cpu else args.fit_limits,
        fit_cap=4 if cpu else args.fit_cap or (64 if quick else 256),
        fit_margin_gib=args.fit_margin_gib,
        amp_steps=2 if cpu else 4,  # fp16's first steps may overflow at the initial loss scale
        demo=not args.skip_demo,
        demo_epochs=(1, 2) if quick else (2, 3),
        demo_overrides=DEMO_OVERRIDES + tuple(args.demo_set),
        demo_min_top1=None if cpu else DEMO_MIN_TOP1,
        script_timeout_s=240.0,
    )


# ----------------------------------------------------------------------------- device helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect dropped tensors (a caught exception's frames form cycles), then return cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"peak_allocated_mib": None, "peak_reserved_mib": None}
    return {
        "peak_allocated_mib": torch.cuda.max_memory_allocated(device) / MiB,
        "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / MiB,
    }


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """No TF32 in matmuls or convolutions, so GPU fp32 can be held to CPU fp32 tolerances."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def memory_cap(device: torch.device, limit_bytes: float) -> Iterator[None]:
    """The caching allocator may reserve at most ``limit_bytes`` (CUDA only); back to all of it after."""
    if device.type != "cuda":
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    free_memory(device)
    torch.cuda.set_per_process_memory_fraction(min(1.0, limit_bytes / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        free_memory(device)


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def is_out_of_memory(err: BaseException) -> bool:
    """The caching allocator's OOM, or a library's (cuBLAS, cuDNN) failed allocation."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "ALLOC_FAILED" in str(err))


# ----------------------------------------------------------------------------- models and steps


def build_dcal(spec: ModelSpec, num_classes: int, drop_path_rate: float) -> nn.Module:
    from dual_cross_attention.models import DualViT

    return DualViT(
        spec.backbone, num_classes=num_classes, img_size=spec.img_size, pretrained=False,
        drop_path_rate=drop_path_rate, backbone_kwargs=spec.backbone_kwargs,
    )  # fmt: skip


class DCALTrainLoss(nn.Module):
    """DualViT and its three-branch uncertainty loss as one module, so one optimizer holds both."""

    def __init__(self, model: nn.Module) -> None:
        from dual_cross_attention.losses import DCALLoss

        super().__init__()
        self.model = model
        self.criterion = DCALLoss(BRANCHES)

    def outputs(self, images: torch.Tensor, labels: torch.Tensor, pair_index: torch.Tensor | None = None):
        """(total loss, DualViTOutput)."""
        out = self.model(images, pair_index)
        return self.criterion(out, labels).total, out

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.outputs(images, labels)[0]


class PlainTrainLoss(nn.Module):
    """The plain timm ViT with cross-entropy: what DCAL's cost is measured against."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.vit(images).float(), labels)


def random_batch(batch: int, img_size: int, num_classes: int, device: torch.device):
    images = torch.randn(batch, 3, img_size, img_size, device=device)
    return images, torch.randint(0, num_classes, (batch,), device=device)


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor):
    """One bf16-autocast training step: forward, loss, backward, AdamW."""
    from dual_cross_attention.runtime import autocast

    optimizer.zero_grad(set_to_none=True)
    with autocast(images.device, torch.bfloat16):
        loss = net(images, labels)
    loss.backward()
    optimizer.step()


def train_step_fn(images: torch.Tensor, labels: torch.Tensor) -> Callable[[nn.Module], Callable[[], None]]:
    """net -> a training step on this batch with a fresh AdamW (its state dies with the step)."""

    def make(net: nn.Module) -> Callable[[], None]:
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        return lambda: train_step(net, optimizer, images, labels)

    return make


def inference_fn(images: torch.Tensor) -> Callable[[nn.Module], Callable[[], None]]:
    from dual_cross_attention.runtime import autocast

    def make(net: nn.Module) -> Callable[[], None]:
        def infer() -> None:
            with torch.no_grad(), autocast(images.device, torch.bfloat16):
                net(images)

        return infer

    return make


# ----------------------------------------------------------------------------- measurement


def interleaved_medians(
    steps: dict[str, Callable[[], object]],
    warmup: int,
    iters: int,
    sync: Callable[[], None] = lambda: None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median seconds of each step over ``iters`` rounds after ``warmup``. The steps take turns (a, b,
    a, b, ...) so drifts in clocks or load hit all alike; ``sync`` runs before each clock reading,
    since device work is asynchronous."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + iters):
        for name, step in steps.items():
            sync()
            start = clock()
            step()
            sync()
            if i >= warmup:
                times[name].append(clock() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def peak_memory(step: Callable[[], None], device: torch.device, warmup: int = 2) -> dict[str, float | None]:
    """Peak allocated / reserved MiB of one step after ``warmup`` steps (by then AdamW's state exists)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    free_memory(device)
    reset_peak(device)
    step()
    synchronize(device)
    return peak_mib(device)


def compare(
    nets: dict[str, nn.Module], make_step: Callable[[nn.Module], Callable[[], None]], batch: int, ctx: Context
) -> dict[str, Any]:
    """Peak memory of each net alone on the device, then the step times of all, interleaved. The nets
    are on the CPU before and after (after an error too, so the next configuration starts clean)."""
    device, plan = ctx.device, ctx.plan
    result: dict[str, Any] = {}
    steps: dict[str, Callable[[], None]] = {}
    try:
        for name, net in nets.items():
            net.to(device)
            result[name] = peak_memory(make_step(net), device)
            net.zero_grad(set_to_none=True)
            net.to("cpu")
            free_memory(device)
        steps.update({name: make_step(net.to(device)) for name, net in nets.items()})
        seconds = interleaved_medians(steps, plan.warmup, plan.iters, sync=lambda: synchronize(device))
    finally:
        steps.clear()  # drops the optimizers and their state
        for net in nets.values():
            net.zero_grad(set_to_none=True)
            net.to("cpu")
        free_memory(device)
    for name, s in seconds.items():
        result[name].update(step_ms=1e3 * s, images_per_s=batch / s)
    dcal, plain = result["dcal"], result["plain"]
    result["ratio"] = {k: dcal[k] / plain[k] if dcal[k] and plain[k] else None for k in RATIO_KEYS}
    return result


@dataclass
class SearchResult:
    largest: int  # 0: not even ``start`` fits
    probes: list[tuple[int, bool]] = field(default_factory=list)  # (batch, fits) in the order tried
    complete: bool = True  # False: stopped early, ``largest`` is a lower bound


def largest_fitting(
    fits: Callable[[int], bool], cap: int, start: int = 1, should_stop: Callable[[], bool] = lambda: False
) -> SearchResult:
    """The largest batch in [start, cap] for which ``fits`` holds, assuming it is monotone: double from
    ``start`` until a batch fails (or ``cap`` fits), then bisect between the last fit and that failure."""
    result = SearchResult(0)

    def probe(batch: int) -> bool:
        result.probes.append((batch, fits(batch)))
        return result.probes[-1][1]

    if not probe(start):
        return result
    low, high = start, None
    while (high is None and low < cap) or (high is not None and high - low > 1):
        if should_stop():
            result.complete = False
            break
        batch = min(2 * low, cap) if high is None else (low + high) // 2
        if probe(batch):
            low = batch
        else:
            high = batch
    result.largest = low
    return result


def probes_monotone(probes: list[tuple[int, bool]]) -> bool:
    """Every batch that fit is smaller than every batch that did not."""
    fitted = [b for b, ok in probes if ok]
    failed = [b for b, ok in probes if not ok]
    return not fitted or not failed or max(fitted) < min(failed)


def fits_from_step(step: Callable[[int], None], cleanup: Callable[[], None]) -> Callable[[int], bool]:
    """``fits(batch)``: whether ``step(batch)`` runs without running out of memory. ``cleanup`` runs after
    every probe, outside the ``except`` block, once the failed step's frames can be collected."""

    def fits(batch: int) -> bool:
        try:
            step(batch)
            ok = True
        except RuntimeError as err:  # torch.cuda.OutOfMemoryError is one
            if not is_out_of_memory(err):
                raise
            ok = False
        cleanup()
        return ok

    return fits


# ----------------------------------------------------------------------------- checks


def add_check(section: dict, name: str, passed: bool | None, measured: str, expected: str) -> None:
    """Record and print one check; ``passed`` None means it could not be evaluated (SKIP)."""
    section.setdefault("checks", []).append(
        {"name": name, "passed": passed, "measured": measured, "expected": expected}
    )
    log(f"  {VERDICTS[passed]}  {name}  {measured}  |  expected: {expected}")


VERDICTS = {True: "PASS", False: "FAIL", None: "SKIP"}


def check_at_most(section: dict, name: str, value: float, tol: float, what: str) -> None:
    add_check(section, name, value <= tol, f"{what} {value:.2e}", f"<= {tol:g}")


def run_item(section: dict, name: str, fn: Callable[[], None], device: torch.device) -> None:
    """Run one correctness item; an exception becomes a failed check and the next item still runs."""
    try:
        fn()
    except Exception as err:  # recorded as a FAIL with its traceback
        section.setdefault("errors", {})[name] = traceback.format_exc()[-STDERR_TAIL:]
        add_check(section, name, False, f"error: {first_line(err)}", "runs")
    free_memory(device)


def selection_overlap(index_a: torch.Tensor, index_b: torch.Tensor) -> torch.Tensor:
    """(B,) share of each image's selected patches (B, k) that both selections contain."""
    return (index_a.unsqueeze(-1) == index_b.unsqueeze(-2)).any(dim=-1).float().mean(dim=-1)


def selection_mismatches(
    rollout: torch.Tensor, index_ref: torch.Tensor, index_other: torch.Tensor, tie_tol: float
) -> list[int]:
    """Images whose top-k selections differ by more than near-ties: a patch in one set and not the
    other is allowed only when its reference rollout is within ``tie_tol`` of the k-th largest."""
    kth = rollout.gather(1, index_ref).min(dim=1).values  # (B,)
    bad = []
    for b in range(rollout.shape[0]):
        swapped = set(index_ref[b].tolist()) ^ set(index_other[b].tolist())
        if any(abs(float(rollout[b, p] - kth[b])) > tie_tol for p in swapped):
            bad.append(b)
    return bad


def forward_differences(ref, out) -> dict[str, Any]:
    """How two ``DualViTOutput`` of the same images differ (``out`` may be on another device)."""
    ref_rollout = ref.rollout.detach().float()
    out_index = out.local_index.cpu()
    same = (ref.local_index.sort(dim=1).values == out_index.sort(dim=1).values).all(dim=1)  # (B,)
    glca = (ref.glca_logits.detach().float() - out.glca_logits.detach().cpu().float()).abs()[same]
    return {
        "sa_logits_max_abs": float(
            (ref.sa_logits.detach().float() - out.sa_logits.detach().cpu()).abs().max()
        ),
        "glca_logits_max_abs": float(glca.max()) if glca.numel() else None,  # where the selections agree
        "glca_images_compared": int(same.sum()),
        "rollout_max_abs": float((ref_rollout - out.rollout.detach().cpu().float()).abs().max()),
        "selection_overlap_min": float(selection_overlap(ref.local_index, out_index).min()),
        "selection_mismatches": selection_mismatches(ref_rollout, ref.local_index, out_index, TIE_TOL),
    }


def gradient_difference(reference: nn.Module, other: nn.Module) -> dict[str, Any]:
    """max |g_other - g_ref| over all parameters of two copies of one module, relative to max |g_ref|;
    and the parameters that lack a gradient in either."""
    diff, scale, missing = 0.0, 0.0, []
    for (name, p_ref), (_, p) in zip(reference.named_parameters(), other.named_parameters(), strict=True):
        if p_ref.grad is None or p.grad is None:
            missing.append(name)
            continue
        g_ref = p_ref.grad.detach().float().cpu()
        diff = max(diff, float((p.grad.detach().float().cpu() - g_ref).abs().max()))
        scale = max(scale, float(g_ref.abs().max()))
    return {"max_abs": diff, "relative": diff / scale if scale else math.inf, "missing": missing}


def gradient_health(module: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the trainable parameters without a gradient, and of those with a non-finite one."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    present = [(n, p.grad) for n, p in named if p.grad is not None]
    finite = torch.stack([torch.isfinite(g).all() for _, g in present]).tolist() if present else []
    return [n for n, p in named if p.grad is None], [
        n for (n, _), ok in zip(present, finite, strict=True) if not ok
    ]


# ----------------------------------------------------------------------------- env section


def sdpa_probe(backend: SDPBackend, dtype: torch.dtype, head_dim: int, device: torch.device) -> str:
    """ "ok" when ``backend`` alone runs forward + backward on (2, 3, 64, head_dim) q/k/v, else why not:
    the error's first line and the reasons torch warned of."""
    q, k, v = (torch.randn(2, 3, 64, head_dim, device=device, dtype=dtype, requires_grad=True) for _ in "qkv")
    with warnings.catch_warnings(record=True) as caught, sdpa_kernel([backend]):
        warnings.simplefilter("always")
        try:
            F.scaled_dot_product_attention(q, k, v).float().sum().backward()
            synchronize(device)
            return "ok"
        except Exception as err:  # any failure is the answer for this backend
            lines = [str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip()]
            why = [line for line in lines if not line.endswith("because:")]  # skip the lists' headers
            return "; ".join([first_line(err), *why[:2]])


def sdpa_support(device: torch.device) -> dict[str, dict[str, dict[str, str]]]:
    """backend -> dtype -> "hd24" / "hd64" -> ``sdpa_probe``."""
    return {
        name: {
            d: {f"hd{hd}": sdpa_probe(backend, dtype, hd, device) for hd in SDPA_HEAD_DIMS}
            for d, dtype in DTYPES.items()
        }
        for name, backend in SDPA_BACKENDS.items()
    }


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    status = git("status", "--porcelain")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def section_env(ctx: Context, section: dict) -> None:
    device = ctx.device
    section.update(
        python=sys.version.split()[0],
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        timm=package_version("timm"),
        git=git_state(),
        device=str(device),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        section.update(
            gpu=props.name,
            total_memory_gib=props.total_memory / GiB,
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
        )
    section["sdpa"] = sdpa_support(device)
    usable = {
        b: [d for d, row in by_dtype.items() if row["hd64"] == "ok"]
        for b, by_dtype in section["sdpa"].items()
    }
    log(f"  {section.get('gpu', device)}; SDPA backends that run at head dim 64: {usable}")


# ----------------------------------------------------------------------------- correctness section


def check_forward(section: dict, spec: ModelSpec, device: torch.device) -> None:
    """Eval-mode outputs on ``device`` against the CPU: without autograd (explicit attention, maps
    reused for rollout) and with it (fused attention, rollout from the kept queries/keys)."""
    torch.manual_seed(0)
    reference = build_dcal(spec, CORRECTNESS_CLASSES, drop_path_rate=0.0).eval()
    model = copy.deepcopy(reference).to(device)
    images = torch.randn(CORRECTNESS_BATCH, 3, spec.img_size, spec.img_size)
    for path, grad in (("no_grad", False), ("grad", True)):
        with exact_fp32(), torch.set_grad_enabled(grad):
            d = forward_differences(reference(images), model(images.to(device)))
        section.setdefault("forward", []).append({"model": spec.label, "path": path, **d})
        name = f"forward.{spec.name}.{path}"
        check_at_most(section, f"{name}.sa_logits", d["sa_logits_max_abs"], LOGITS_TOL, "max |GPU - CPU|")
        if d["glca_logits_max_abs"] is None:
            add_check(section, f"{name}.glca_logits", None, "no image with equal selections", "")
        else:
            what = f"max |GPU - CPU| over the {d['glca_images_compared']} images with equal selections:"
            check_at_most(section, f"{name}.glca_logits", d["glca_logits_max_abs"], LOGITS_TOL, what)
        check_at_most(section, f"{name}.rollout", d["rollout_max_abs"], ROLLOUT_TOL, "max |GPU - CPU|")
        add_check(
            section,
            f"{name}.local_index",
            not d["selection_mismatches"],
            f"min overlap {d['selection_overlap_min']:.2f}; images differing beyond near-ties: "
            f"{d['selection_mismatches'] or 'none'}",
            f"equal top-k sets up to rollout ties within {TIE_TOL:g}",
        )


def check_gradients(section: dict, spec: ModelSpec, device: torch.device, checkpointing: bool) -> None:
    """fp32 training gradients, fixed pair_index, no drop path: ``device`` against the CPU; or, with
    ``checkpointing``, checkpointed against not, both on ``device``."""
    torch.manual_seed(0)
    reference = DCALTrainLoss(build_dcal(spec, CORRECTNESS_CLASSES, drop_path_rate=0.0)).train()
    images, labels = random_batch(CORRECTNESS_BATCH, spec.img_size, CORRECTNESS_CLASSES, torch.device("cpu"))
    pair_index = torch.roll(torch.arange(CORRECTNESS_BATCH), 1)
    other = copy.deepcopy(reference).to(device)
    if checkpointing:
        reference.to(device)
        other.model.grad_checkpointing = True
    losses, selections = [], []
    with exact_fp32():
        for net in (reference, other):
            place = next(net.parameters()).device
            loss, out = net.outputs(images.to(place), labels.to(place), pair_index.to(place))
            loss.backward()
            losses.append(loss.item())
            selections.append(out.local_index.cpu())
    d = {"model": spec.label, "checkpointing": checkpointing, "losses": losses}
    d.update(gradient_difference(reference, other))
    section.setdefault("gradients", []).append(d)
    name, tol, what = (
        (f"checkpointing.{spec.name}", CHECKPOINT_REL_TOL, "checkpointed - not")
        if checkpointing
        else (f"gradients_fp32.{spec.name}", GRAD_REL_TOL, "GPU - CPU")
    )
    if not torch.equal(*selections):  # GLCA attends from other patches: gradients differ by design
        add_check(section, name, None, "GLCA selections differ (a near-tie); gradients not comparable", "")
        return
    measured = (
        f"max |{what}| / max |g| {d['relative']:.2e}; losses {losses[0]:.6f} / {losses[1]:.6f}; "
        f"parameters without a gradient: {d['missing'] or 'none'}"
    )
    add_check(section, name, d["relative"] <= tol and not d["missing"], measured, f"<= {tol:g}, all have one")


def check_amp(section: dict, spec: ModelSpec, device: torch.device, dtype_name: str, steps: int) -> None:
    """``steps`` training steps under autocast, with loss scaling for fp16 as the trainer does."""
    from dual_cross_attention.runtime import autocast, grad_scaler

    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    net = DCALTrainLoss(build_dcal(spec, CORRECTNESS_CLASSES, drop_path_rate=0.0)).to(device).train()
    images, labels = random_batch(CORRECTNESS_BATCH, spec.img_size, CORRECTNESS_CLASSES, device)
    pair_index = torch.roll(torch.arange(CORRECTNESS_BATCH, device=device), 1)
    with torch.no_grad(), exact_fp32():
        fp32_loss = float(net.outputs(images, labels, pair_index)[0])
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    scaler = grad_scaler(device, dtype)
    history = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = net.outputs(images, labels, pair_index)[0]
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        missing, non_finite = gradient_health(net)
        scaler.step(optimizer)
        scaler.update()
        scale = scaler.get_scale() if scaler.is_enabled() else None
        history.append(
            {"loss": loss.item(), "no_grad": missing, "non_finite_grad": non_finite, "scale": scale}
        )
    section.setdefault("amp", []).append(
        {"model": spec.label, "dtype": dtype_name, "fp32_loss": fp32_loss, "steps": history}
    )
    name, losses, last = f"amp_{dtype_name}.{spec.name}", [s["loss"] for s in history], history[-1]
    add_check(
        section,
        f"{name}.losses_finite",
        all(map(math.isfinite, losses)),
        "losses " + ", ".join(f"{x:.4f}" for x in losses),
        "all finite",
    )
    overflowed = sum(bool(s["non_finite_grad"]) for s in history)  # GradScaler skipped these steps
    measured = (
        f"last step: without a gradient {last['no_grad'][:3] or 'none'}, non-finite "
        f"{last['non_finite_grad'][:3] or 'none'}; steps with a non-finite gradient: {overflowed}"
    )
    ok = not last["no_grad"] and not last["non_finite_grad"]
    add_check(
        section, f"{name}.gradients", ok, measured, "every parameter has a finite gradient at the last step"
    )
    gap = abs(losses[0] - fp32_loss) / abs(fp32_loss)
    add_check(
        section,
        f"{name}.loss_vs_fp32",
        gap <= AMP_LOSS_REL_TOL,
        f"first loss {losses[0]:.4f}, fp32 {fp32_loss:.4f}: {gap:.1e}",
        f"<= {AMP_LOSS_REL_TOL:g}",
    )


def run_script(name: str, command: list[str], timeout: float) -> dict[str, Any]:
    """A repository script in a subprocess (cwd = repository root); the tail of its output on failure."""
    log(f"  {name}: {' '.join(command[1:])}")
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as err:  # its output comes as bytes, whatever text= said
        rc, stdout, stderr = (
            None,
            _text(err.stdout),
            _text(err.stderr) + f"\n[timed out after {timeout:.0f} s]",
        )
    result = {"name": name, "command": command, "rc": rc, "seconds": time.perf_counter() - start}
    if rc != 0:
        result.update(stderr_tail=stderr[-STDERR_TAIL:], stdout_tail=stdout[-500:])
    log(f"  {name}: rc {rc} in {result['seconds']:.1f} s")
    return result


def _text(value: str | bytes | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value or ""


def read_metrics(metrics_csv: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.csv, numbers as floats."""

    def number(value: str) -> float | str:
        try:
            return float(value)
        except ValueError:
            return value

    with metrics_csv.open(newline="") as f:
        return [{key: number(value) for key, value in row.items()} for row in csv.DictReader(f)]


def check_demo(ctx: Context, section: dict) -> None:
    """train.py for the first epochs, --resume auto to the total, evaluate.py on best.pt."""
    plan, out = ctx.plan, ctx.out_dir.resolve()
    missing = [name for name in DEMO_MODULES if importlib.util.find_spec(name) is None]
    if missing:  # a machine without the training dependencies: say so rather than fail on an import
        add_check(
            section, "demo", None, f"not run: {', '.join(missing)} not installed", "train.py, evaluate.py"
        )
        return
    first, total = plan.demo_epochs
    run_dir, eval_json = out / "runs" / DEMO_RUN, out / "eval.json"
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun into the same --out starts over
    eval_json.unlink(missing_ok=True)
    train = [sys.executable, "train.py", "--no-progress"]
    settings = [
        "--set",
        f"run.output_dir={out / 'runs'}",
        f"run.name={DEMO_RUN}",
        f"data.root={out / 'demo_data'}",
        *plan.demo_overrides,
    ]
    scripts = [
        ("train", [*train, *settings, f"train.epochs={first}"]),
        ("resume", [*train, "--resume", "auto", *settings, f"train.epochs={total}"]),
        ("evaluate", [sys.executable, "evaluate.py", "--checkpoint", str(run_dir / "checkpoints" / "best.pt"),
                      "--json", str(eval_json), "--no-progress", "--throughput-iters", "2"]),
    ]  # fmt: skip
    demo = section["demo"] = {"epochs": [first, total], "steps": []}
    for name, command in scripts:
        if ctx.time_left() < 30:
            demo["steps"].append({"name": name, "rc": None, "skipped": "time budget"})
            add_check(section, f"demo.{name}", False, "not run: time budget", "rc 0")
            return
        result = run_script(name, command, min(plan.script_timeout_s, ctx.time_left()))
        demo["steps"].append(result)
        add_check(
            section,
            f"demo.{name}",
            result["rc"] == 0,
            f"rc {result['rc']}, {result['seconds']:.1f} s",
            "rc 0",
        )
        ctx.save()
        if result["rc"] != 0:
            return
    rows = read_metrics(run_dir / "metrics.csv")
    last = demo["last_epoch"] = rows[-1] if rows else {}
    metrics = json.loads(eval_json.read_text())
    demo["eval_top1"] = {mode: (metrics[mode] or {}).get("top1") for mode in ("sa", "glca", "sa+glca")}
    epochs = [int(row["epoch"]) for row in rows]  # 0-based; the resumed run keeps the first run's rows
    add_check(section, "demo.epochs", epochs == list(range(total)), f"metrics.csv epochs {epochs}",
              f"{list(range(total))}")  # fmt: skip
    if plan.demo_min_top1 is not None:
        top1 = last.get("eval_top1_sa_glca", math.nan)
        add_check(
            section,
            "demo.learns",
            top1 >= plan.demo_min_top1,
            f"sa+glca test top-1 {top1:.1f}% after {total} epochs",
            f">= {plan.demo_min_top1:g}%",
        )


def section_correctness(ctx: Context, section: dict) -> None:
    device, plan = ctx.device, ctx.plan
    section["models"] = {spec.name: spec.description for spec in plan.correctness_models}
    items: list[tuple[str, Callable[[], None]]] = []
    for spec in plan.correctness_models:
        items += [
            (f"forward.{spec.name}", lambda s=spec: check_forward(section, s, device)),
            (f"gradients_fp32.{spec.name}", lambda s=spec: check_gradients(section, s, device, False)),
            (f"checkpointing.{spec.name}", lambda s=spec: check_gradients(section, s, device, True)),
        ]
    spec = plan.correctness_models[0]
    for dtype_name in ("bf16", "fp16"):
        items.append(
            (
                f"amp_{dtype_name}.{spec.name}",
                lambda d=dtype_name: check_amp(section, spec, device, d, plan.amp_steps),
            )
        )
    if plan.demo:
        items.append(("demo", lambda: check_demo(ctx, section)))
    for name, fn in items:
        run_item(section, name, fn, device)
        ctx.save()


# ----------------------------------------------------------------------------- speed section


def section_speed(ctx: Context, section: dict) -> None:
    plan = ctx.plan
    section.update(
        batch=plan.batch,
        inference_batch=plan.inference_batch,
        precision="bf16",
        warmup=plan.warmup,
        iters=plan.iters,
        train=[],
        inference=[],
    )
    for spec in plan.speed_models:
        speed_model(ctx, section, spec)
        free_memory(ctx.device)


def speed_model(ctx: Context, section: dict, spec: ModelSpec) -> None:
    """Training steps without and with checkpointing, then inference: DCAL against its plain ViT."""
    plan, device = ctx.plan, ctx.device
    torch.manual_seed(0)
    dcal = build_dcal(spec, NUM_CLASSES, drop_path_rate=0.1)
    plain = copy.deepcopy(dcal.backbone)  # model.backbone is the plain timm ViT that DCAL drives
    nets = {"dcal": DCALTrainLoss(dcal), "plain": PlainTrainLoss(plain)}
    make_step = train_step_fn(*random_batch(plan.batch, spec.img_size, NUM_CLASSES, device))
    for ckpt in (False, True):
        dcal.grad_checkpointing = ckpt
        plain.set_grad_checkpointing(ckpt)
        row = {"model": spec.label, "checkpointing": ckpt}
        speed_item(ctx, section["train"], row, lambda: compare(nets, make_step, plan.batch, ctx))
    dcal.grad_checkpointing = False
    plain.set_grad_checkpointing(False)
    make_step = inference_fn(
        torch.randn(plan.inference_batch, 3, spec.img_size, spec.img_size, device=device)
    )
    nets = {"dcal": dcal.eval(), "plain": plain.eval()}
    row = {"model": spec.label}
    speed_item(ctx, section["inference"], row, lambda: compare(nets, make_step, plan.inference_batch, ctx))


def speed_item(ctx: Context, rows: list, row: dict, measure: Callable[[], dict]) -> None:
    """Append ``row`` and fill it with ``measure()``; a skip or an error is recorded in the row."""
    rows.append(row)
    what = row["model"] + (
        f", checkpointing {'on' if row['checkpointing'] else 'off'}"
        if "checkpointing" in row
        else ", inference"
    )
    if ctx.expired():
        row.update(status="skipped", reason="time budget")
    else:
        try:
            row.update(status="ok", **measure())
        except Exception as err:  # recorded in the row; the next configuration still runs
            row.update(status="error", error=first_line(err), traceback=traceback.format_exc()[-STDERR_TAIL:])
        free_memory(ctx.device)
    if row["status"] == "ok":
        dcal, plain = row["dcal"]["step_ms"], row["plain"]["step_ms"]
        log(f"  {what}: DCAL {dcal:.1f} ms, plain {plain:.1f} ms ({dcal / plain:.2f}x)")
    else:
        log(f"  {what}: {row['status']} {row.get('error') or row.get('reason')}")
    ctx.save()


# ----------------------------------------------------------------------------- fit section


def section_fit(ctx: Context, section: dict) -> None:
    plan, device, spec = ctx.plan, ctx.device, ctx.plan.fit_model
    section.update(
        model=spec.description,
        cap=plan.fit_cap,
        margin_gib=plan.fit_margin_gib,
        precision="bf16",
        searches=[],
    )
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    torch.manual_seed(0)
    net = DCALTrainLoss(build_dcal(spec, NUM_CLASSES, drop_path_rate=0.1)).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)

    def step(batch: int) -> None:  # the batch lives and dies in this frame
        train_step(net, optimizer, *random_batch(batch, spec.img_size, NUM_CLASSES, device))
        synchronize(device)

    def cleanup() -> None:
        optimizer.zero_grad(set_to_none=True)
        free_memory(device)

    fits = fits_from_step(step, cleanup)
    known = {False: 2, True: 2}  # PWCA needs 2 images; what fits under a smaller limit fits a larger one
    for limit in plan.fit_limits_gib:
        for ckpt in (False, True):
            entry: dict[str, Any] = {"limit_gib": limit, "checkpointing": ckpt}
            section["searches"].append(entry)
            if ctx.expired():
                entry.update(status="skipped", reason="time budget")
                continue
            if total is not None and total < limit * GiB:
                entry.update(status="skipped", reason=f"the GPU has {total / GiB:.1f} GiB")
                continue
            net.model.grad_checkpointing = ckpt
            cap_bytes = (limit - plan.fit_margin_gib) * GiB
            start = time.perf_counter()
            with memory_cap(device, cap_bytes):
                found = largest_fitting(fits, plan.fit_cap, known[ckpt], should_stop=ctx.expired)
            known[ckpt] = max(known[ckpt], found.largest)
            entry.update(
                status="ok" if found.complete else "stopped (time budget)",
                allocator_cap_gib=cap_bytes / GiB,
                largest_batch=found.largest,
                at_cap=found.largest == plan.fit_cap,
                probes=found.probes,
                monotone=probes_monotone(found.probes),
                seconds=time.perf_counter() - start,
            )
            log(
                f"  {limit:g} GiB, checkpointing {'on' if ckpt else 'off'}: batch {found.largest}"
                f"{' (the cap)' if entry['at_cap'] else ''}, {len(found.probes)} probes"
            )
            ctx.save()


# ----------------------------------------------------------------------------- report


def new_results(argv: list[str], device: torch.device, plan: Plan) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "command": ["benchmarks/gpu_check.py", *argv],
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "plan": asdict(plan),
        "sections": {name: {"status": "not run"} for name in SECTIONS},
        "passed": None,  # set at the end: no correctness failure
    }


def failed_checks(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for c in results["sections"]["correctness"].get("checks", []) if c["passed"] is False]


def exit_code(results: dict[str, Any]) -> int:
    """1 when a correctness check failed or the correctness section itself broke, else 0."""
    return int(bool(failed_checks(results)) or results["sections"]["correctness"]["status"] == "error")


def fmt(value: Any, spec: str = ".1f") -> str:
    if value is None:
        return "-"
    return format(value, spec) if isinstance(value, float) else str(value)


def md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    def line(cells: list[Any]) -> str:
        return "| " + " | ".join(fmt(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return [line(headers), "|" + "---|" * len(headers), *map(line, rows), ""]


def code_block(title: str, text: str) -> list[str]:
    return [title, "", "```", text, "```", ""]


ENV_KEYS = (
    "gpu",
    "total_memory_gib",
    "compute_capability",
    "multiprocessors",
    "torch",
    "cuda",
    "cudnn",
    "timm",
    "python",
    "device",
)


def render_env(env: dict) -> list[str]:
    rows = [[k, env[k]] for k in ENV_KEYS if k in env]
    if env.get("git"):
        rows += [["git commit", env["git"]["commit"]], ["uncommitted changes", env["git"]["dirty"]]]
    lines = md_table(["", ""], rows)
    if not env.get("sdpa"):
        return lines
    columns = [(d, f"hd{hd}") for d in DTYPES for hd in SDPA_HEAD_DIMS]
    reasons: list[str] = []  # each distinct failure once, referenced by number from the table
    rows = []
    for backend, by_dtype in env["sdpa"].items():
        cells = [by_dtype.get(d, {}).get(hd, "-") for d, hd in columns]
        reasons += [c for c in dict.fromkeys(cells) if c not in ("ok", "-", *reasons)]
        rows.append([backend, *(c if c in ("ok", "-") else f"no ({reasons.index(c) + 1})" for c in cells)])
    lines += ["SDPA backends, forward + backward on (2, 3, 64, hd):", ""]
    lines += md_table(["backend", *(f"{d} {hd}" for d, hd in columns)], rows)
    return lines + [f"{i}. {reason}" for i, reason in enumerate(reasons, 1)] + [""]


DEMO_COLUMNS = (
    "epoch",
    "train_loss",
    "eval_top1_sa",
    "eval_top1_glca",
    "eval_top1_sa_glca",
    "epoch_time_s",
    "peak_mem_mb",
    "skipped_steps",
)


def render_correctness(section: dict) -> list[str]:
    checks = section.get("checks", [])
    rows = [[c["name"], c["measured"], c["expected"], VERDICTS[c["passed"]]] for c in checks]
    models = "; ".join(f"`{name}`: {description}" for name, description in section.get("models", {}).items())
    lines = [f"Models: {models}.", ""] if models else []
    lines += md_table(["check", "measured", "expected", "result"], rows) if rows else []
    demo = section.get("demo")
    if demo:
        lines += ["Demo: `train.py`, `train.py --resume auto`, `evaluate.py`, each in a subprocess:", ""]
        lines += md_table(
            ["step", "rc", "seconds"], [[s["name"], s["rc"], s.get("seconds")] for s in demo["steps"]]
        )
        for s in demo["steps"]:
            if s.get("stderr_tail"):
                lines += code_block(f"`{s['name']}` stderr, the end:", s["stderr_tail"])
        if demo.get("last_epoch"):
            keys = [k for k in DEMO_COLUMNS if k in demo["last_epoch"]]
            lines += [
                "Last epoch (metrics.csv):",
                "",
                *md_table(keys, [[demo["last_epoch"][k] for k in keys]]),
            ]
        if demo.get("eval_top1"):
            top1 = demo["eval_top1"]
            lines += ["evaluate.py, test top-1 (%):", "", *md_table(list(top1), [list(top1.values())])]
    for name, text in section.get("errors", {}).items():
        lines += code_block(f"`{name}` traceback, the end:", text)
    return lines


SPEED_COLUMNS = {
    "step_ms": "ms",
    "images_per_s": "img/s",
    "peak_allocated_mib": "peak alloc MiB",
    "peak_reserved_mib": "peak reserved MiB",
}


def speed_headers() -> list[str]:
    headers = []
    for key, unit in SPEED_COLUMNS.items():
        headers += [f"DCAL {unit}", f"plain {unit}", *(["ratio"] if key in RATIO_KEYS else [])]
    return headers


def speed_cells(row: dict) -> list[Any]:
    """DCAL, plain (and DCAL / plain) per measured key; a row that did not run says why in its first cell."""
    if row.get("status") != "ok":
        note = f"{row.get('status')}: {row.get('error') or row.get('reason', '')}"
        return [note] + [""] * (len(speed_headers()) - 1)
    cells: list[Any] = []
    for key in SPEED_COLUMNS:
        spec = ".2f" if key == "step_ms" else ".0f"
        cells += [fmt(row["dcal"][key], spec), fmt(row["plain"][key], spec)]
        if key in RATIO_KEYS:
            value = row["ratio"][key]
            cells.append("-" if value is None else f"{value:.2f}x")
    return cells


def render_speed(section: dict) -> list[str]:
    lines = [
        f"Training step, batch {section.get('batch')}, bf16 autocast, AdamW; median of "
        f"{section.get('iters')} steps after {section.get('warmup')} warm-up, the models taking turns; "
        "memory of each model alone:",
        "",
    ]
    rows = [
        [r["model"], "on" if r["checkpointing"] else "off", *speed_cells(r)] for r in section.get("train", [])
    ]
    lines += md_table(["model", "checkpointing", *speed_headers()], rows)
    lines += [
        f"SA+GLCA inference against the plain ViT forward, batch {section.get('inference_batch')}, "
        "eval mode, no_grad, bf16:",
        "",
    ]
    rows = [[r["model"], *speed_cells(r)] for r in section.get("inference", [])]
    return lines + md_table(["model", *speed_headers()], rows)


def render_fit(section: dict) -> list[str]:
    lines = [
        f"{section.get('model')}: DCAL training step (PWCA, three-branch loss, backward, AdamW, bf16), "
        f"batches up to {section.get('cap')}; the allocator is capped at the limit minus "
        f"{section.get('margin_gib')} GiB for the CUDA context. Probes: batch+ fits, batch- does not.",
        "",
    ]
    rows = []
    for s in section.get("searches", []):
        found = s.get("largest_batch")
        found = f">= {found} (the cap)" if s.get("at_cap") else found
        note = s.get("reason") or ("" if s.get("status") == "ok" else s.get("status"))
        probes = " ".join(f"{b}{'+' if ok else '-'}" for b, ok in s.get("probes", []))
        rows.append(
            [
                f"{s['limit_gib']:g} GiB",
                "on" if s["checkpointing"] else "off",
                found,
                note,
                probes,
                s.get("monotone"),
                s.get("seconds"),
            ]
        )
    headers = ["memory", "checkpointing", "largest batch", "note", "probes", "monotone", "seconds"]
    return lines + md_table(headers, rows)


RENDERERS = {
    "env": ("Environment", render_env),
    "correctness": ("Correctness", render_correctness),
    "speed": ("Speed and memory: DCAL against the plain timm ViT", render_speed),
    "fit": ("Will batch N fit? The largest DCAL training batch per memory limit", render_fit),
}


def render_markdown(results: dict[str, Any]) -> str:
    sections = results["sections"]
    if results["passed"] is None:
        verdict = "incomplete"
    else:
        verdict = "no correctness failure" if results["passed"] else "CORRECTNESS FAILED"
    lines = [
        f"# dcal GPU check: {verdict}",
        "",
        f"`{' '.join(results['command'])}`, {results['started']}",
        "",
    ]
    lines += md_table(
        ["section", "status", "seconds"], [[n, s["status"], s.get("seconds")] for n, s in sections.items()]
    )
    failed = failed_checks(results)
    if failed:
        lines += ["Failed checks: " + ", ".join(c["name"] for c in failed), ""]
    for name, (title, render) in RENDERERS.items():
        section = sections[name]
        lines += [f"## {title}", ""]
        if section["status"] != "ok":
            lines += [
                f"_{section['status']}_" + (f": {section['error']}" if section.get("error") else ""),
                "",
            ]
        if section["status"] not in ("not run", "not requested"):
            lines += render(section)
    return "\n".join(lines)


def write_reports(results: dict[str, Any], out_dir: Path) -> None:
    """gpu_check.json and gpu_check.md, each replaced atomically so a killed run leaves whole files."""
    texts = {
        "gpu_check.json": json.dumps(results, indent=2, default=str),
        "gpu_check.md": render_markdown(results),
    }
    for name, text in texts.items():
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text + "\n")
        os.replace(tmp, out_dir / name)


# ----------------------------------------------------------------------------- main


SECTION_FUNCTIONS: dict[str, Callable[[Context, dict], None]] = {
    "env": section_env,
    "correctness": section_correctness,
    "speed": section_speed,
    "fit": section_fit,
}


def run_section(name: str, ctx: Context, section: dict) -> None:
    """Run one section into ``section``; an exception is recorded there and the next section still runs."""
    log(f"{name}: start")
    section["status"] = "running"
    ctx.save()
    start = time.perf_counter()
    try:
        SECTION_FUNCTIONS[name](ctx, section)
        section["status"] = "ok"
    except Exception as err:  # recorded in the report; the other sections still run
        section.update(status="error", error=first_line(err), traceback=traceback.format_exc()[-STDERR_TAIL:])
    section["seconds"] = time.perf_counter() - start
    free_memory(ctx.device)
    ctx.save()
    suffix = f": {section['error']}" if "error" in section else ""
    log(f"{name}: {section['status']} in {section['seconds']:.1f} s{suffix}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device", file=sys.stderr)
        return 1
    if str(REPO) not in sys.path:  # the package without `pip install -e .`
        sys.path.insert(0, str(REPO))
    device, plan, out_dir = torch.device(args.device), make_plan(args), Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = new_results(argv, device, plan)
    ctx = Context(
        plan, device, out_dir, time.monotonic() + args.budget_s, lambda: write_reports(results, out_dir)
    )
    for name in SECTIONS:
        section = results["sections"][name]
        if name not in args.sections:
            section["status"] = "not requested"
        elif ctx.expired():
            section["status"] = "skipped (time budget)"
        else:
            run_section(name, ctx, section)
    results["passed"] = exit_code(results) == 0
    ctx.save()
    for check in failed_checks(results):
        log(f"FAIL {check['name']}: {check['measured']} (expected {check['expected']})")
    verdict = "no correctness failure" if results["passed"] else "CORRECTNESS FAILED"
    log(f"{verdict}; wrote {out_dir / 'gpu_check.json'} and gpu_check.md")
    return exit_code(results)


if __name__ == "__main__":
    sys.exit(main())
