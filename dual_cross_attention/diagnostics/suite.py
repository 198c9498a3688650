"""The five check groups of ``test_fixes.py``, in the order it prints them, as one stream of results."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch

from ..builders import build_loss
from ..config import Config
from ..runtime import resolve_precision, seed_everything
from . import memory
from .branches import branch_checks
from .cost import StepCosts, extrapolate_costs, measure_costs
from .learning import LearningSpec, learning_checks
from .lr import lr_checks, nominal_schedule
from .probe import Probe, backbone_depth, build_probe_model, make_probe, probe_batch
from .result import CheckResult, skipped
from .weighting import weighting_checks

_logger = logging.getLogger(__name__)

COST_BATCH = 2  # the cost benchmarks' batch; the ratios do not depend on it
MAX_STEP_BATCH = 4  # growth and branch checks: enough for derangements, cheap for big configs
CPU_MAX_DEPTH = 2  # a big config on a CPU: blocks of the 20-step and GLCA/PWCA checks' model
CPU_MAX_IMG_SIZE = 224  # ... and its image size (cost ratios use the config's, see step_costs)
LEARNING_NAMES = ("learning.accuracy_rises", "learning.loss_finite", "learning.no_branch_collapse")


def _step_batch(cfg: Config) -> int:
    return max(2, min(cfg.train.batch_size, MAX_STEP_BATCH))


def step_costs(cfg: Config, device: torch.device, reduce: bool) -> tuple[StepCosts, str]:
    """Cost counts of the config's model at its image size and a note for the report. With
    ``reduce``, measured at 1 and 2 blocks and extrapolated to the backbone's depth."""
    depth = backbone_depth(cfg)
    if not reduce or depth <= 2:
        probe = make_probe(cfg)
        return _measure(probe, device), f"{probe.note}, batch {COST_BATCH}"
    one, two = (_measure(make_probe(cfg, max_depth=d), device) for d in (1, 2))
    note = (
        f"{cfg.model.backbone} at {cfg.data.img_size} px, batch {COST_BATCH}, from depths 1 and 2 to {depth}"
    )
    return extrapolate_costs(one, two, depth), note


def _measure(probe: Probe, device: torch.device) -> StepCosts:
    images, labels = probe_batch(probe, COST_BATCH, device)
    return measure_costs(build_probe_model(probe, device), images, labels)


def memory_checks(cfg: Config, device: torch.device, reduce: bool) -> list[CheckResult]:
    """Cost ratios and checkpointing at the config's image size; growth over 20 steps; CUDA peak.
    The CUDA peak is measured first, while no other model is on the device."""
    amp_dtype = resolve_precision(cfg.train.precision, device)
    cuda_peak = _cuda_peak(cfg, device, amp_dtype)
    probe = _step_probe(cfg, reduce)
    model, criterion = build_probe_model(probe, device), build_loss(probe.cfg).to(device)
    batch = probe_batch(probe, _step_batch(cfg), device)
    peak_lr = nominal_schedule(cfg.train).peak_lr
    growth = memory.check_memory_growth(model, criterion, batch, device, amp_dtype, lr=peak_lr)
    del model, criterion, batch
    costs, note = step_costs(cfg, device, reduce)
    return [
        *memory.check_cost_ratios(costs, note, uses_pwca=cfg.model.pwca),
        memory.check_checkpointing(costs, note),
        _noted(growth, probe.note) if reduce else growth,
        cuda_peak,
    ]


def _cuda_peak(cfg: Config, device: torch.device, amp_dtype: torch.dtype) -> CheckResult:
    """The full model (no reductions) at the configured physical batch and image size."""
    if device.type != "cuda":
        return memory.cuda_peak_not_measured(device)
    full = make_probe(cfg)
    model, criterion = build_probe_model(full, device), build_loss(full.cfg).to(device)
    batch = probe_batch(full, cfg.train.batch_size, device)
    return memory.check_cuda_peak(model, criterion, batch, device, amp_dtype, full.note)


def _step_probe(cfg: Config, reduce: bool) -> Probe:
    if reduce:
        return make_probe(cfg, max_depth=CPU_MAX_DEPTH, max_img_size=CPU_MAX_IMG_SIZE)
    return make_probe(cfg)


def _learning(
    demo_cfg: Config, device: torch.device, quick: bool, spec: LearningSpec | None
) -> list[CheckResult]:
    if quick:
        return [skipped(name, "--quick", "a short demo training") for name in LEARNING_NAMES]
    return learning_checks(demo_cfg, device, spec)


def _branches(cfg: Config, device: torch.device, reduce: bool) -> list[CheckResult]:
    probe = _step_probe(cfg, reduce)
    model, criterion = build_probe_model(probe, device), build_loss(probe.cfg).to(device)
    images, labels = probe_batch(probe, _step_batch(cfg), device)
    results = branch_checks(model, criterion, images, labels)
    return [_noted(r, probe.note) for r in results] if reduce else results


def _noted(result: CheckResult, note: str) -> CheckResult:
    return CheckResult(result.name, result.passed, f"{result.measured} ({note})", result.expected)


def run_checks(
    cfg: Config,
    demo_cfg: Config,
    device: torch.device,
    quick: bool = False,
    reduce: bool = False,
    learning: LearningSpec | None = None,
) -> Iterator[CheckResult]:
    """Yield every check's result as soon as it is known.

    Args:
        cfg: the config under test (LR, memory, loss weighting, GLCA/PWCA checks).
        demo_cfg: the demo config, trained briefly by the learning check.
        device: where models run.
        quick: skip the learning check (a short training, the slow part).
        reduce: run big models smaller (CPU): ``CPU_MAX_DEPTH`` blocks for the cost ratios, and
            also ``CPU_MAX_IMG_SIZE`` px for the 20-step and GLCA/PWCA checks. Each line says so.
        learning: how short the learning check's training is (default ``LearningSpec()``).
    """
    seed_everything(0)
    groups = (
        ("1 lr", lambda: lr_checks(cfg.train)),
        ("2 memory", lambda: memory_checks(cfg, device, reduce)),
        ("3 learning", lambda: _learning(demo_cfg, device, quick, learning)),
        ("4 loss weighting", lambda: weighting_checks(build_loss(cfg))),
        ("5 GLCA/PWCA", lambda: _branches(cfg, device, reduce)),
    )
    for title, run in groups:
        start = time.perf_counter()
        yield from run()
        _logger.info("check group %s took %.1f s", title, time.perf_counter() - start)
