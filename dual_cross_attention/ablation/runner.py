"""Run an ablation: every variant x seed as an ordinary training run, one after the other.

A run whose ``last.pt`` holds the final epoch is skipped; one with an earlier ``last.pt`` is
continued (``resume="auto"``), so rerunning the same command after a crash or a time limit picks
up where it stopped. Under torchrun every process trains every run together (rank 0 decides
what is left, the others follow) and only rank 0 writes the tables.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..builders import build_model
from ..checkpoint import load_checkpoint
from ..config import AblationConfig, Config
from ..diagnostics.cost import count_flops, dcal_loss
from ..diagnostics.learning import package_logging_restored
from ..distributed import DistInfo, broadcast_from_main, init_distributed
from ..errors import DcalError, UsageError
from ..resume import check_resume_compatible
from ..runtime import resolve_device
from ..trainer import train
from .report import AblationReport, RunRecord, read_run, write_report
from .variants import BASELINE, check_name, known_variants, select_variants, variant_config

_logger = logging.getLogger(__name__)
COST_BATCH = 2  # images per counted step (PWCA needs two)


@dataclass(frozen=True)
class PlannedRun:
    variant: str
    seed: int
    cfg: Config  # the run's full config (variant overrides, seed, run directory applied)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.output_dir) / self.cfg.run.name


@dataclass(frozen=True)
class RunState:
    """What a run's ``last.pt`` says: completed epochs (0: not started), eval split, classes."""

    epochs_done: int = 0
    eval_split: str | None = None
    num_classes: int | None = None


def ablation_name(base: Config, name: str | None, config_path: str | Path | None) -> str:
    """``name``, else the config's ``ablation.name``, else the config file's stem."""
    chosen = name or base.ablation.name or (Path(config_path).stem if config_path else None)
    if chosen is None:
        raise UsageError("an ablation needs a name: give --name, set ablation.name or use a config file")
    check_name(chosen, "the ablation name")
    return chosen


def plan_runs(
    base: Config, variants: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], ablation_dir: Path
) -> list[PlannedRun]:
    """Every variant x seed, each config built and validated before anything trains. The runs'
    configs drop the ``ablation`` section: each describes one ordinary run."""
    run_base = copy.deepcopy(base)
    run_base.ablation = AblationConfig()
    return [
        PlannedRun(variant, seed, variant_config(run_base, variant, overrides, seed, ablation_dir))
        for variant, overrides in variants.items()
        for seed in dict.fromkeys(seeds)
    ]


def run_state(run: PlannedRun) -> RunState:
    """Read ``run``'s last.pt; a checkpoint made with another config is an error (its numbers
    would belong to a different experiment)."""
    last = run.run_dir / "checkpoints" / "last.pt"
    if not last.exists():
        return RunState()
    state = load_checkpoint(last)
    advice = (
        "ablate.py sets run.name itself: to run this config as a separate ablation, give it another --name"
    )
    try:
        check_resume_compatible(run.cfg, state["config"], last)
    except UsageError as err:
        raise UsageError(f"{err}\n{advice}") from err
    trained_for = state["config"]["train"]["epochs"]
    if trained_for > run.cfg.train.epochs:
        # its early epochs ran on a longer cosine schedule: not what a shorter run would reach
        raise UsageError(
            f"{last} was trained for train.epochs={trained_for}, more than the {run.cfg.train.epochs} asked "
            f"for now; set train.epochs={trained_for}, or: {advice}"
        )
    return RunState(state["epoch"] + 1, state["eval_split"], len(state["classes"]))


def _epochs_done(run: PlannedRun, dist: DistInfo) -> int:
    """Rank 0 reads the run's state, every process follows (an error stops all of them)."""
    outcome: int | DcalError | None = None
    if dist.is_main:
        try:
            outcome = run_state(run).epochs_done
        except DcalError as err:
            outcome = err
    outcome = broadcast_from_main(outcome)
    if isinstance(outcome, DcalError):
        raise outcome
    return outcome


def train_runs(runs: Sequence[PlannedRun], show_progress: bool) -> DistInfo:
    """Train what is left of ``runs``, in order; returns this process's place in torchrun."""
    dist = init_distributed(resolve_device(runs[0].cfg.train.device))
    for index, run in enumerate(runs, 1):
        done, epochs, where = _epochs_done(run, dist), run.cfg.train.epochs, f"[{index}/{len(runs)}]"
        if done >= epochs:
            _logger.info("%s %s: finished (%d epochs), skipped", where, run.run_dir, done)
            continue
        _logger.info("%s %s: %s", where, run.run_dir, f"resuming after epoch {done}" if done else "starting")
        with package_logging_restored():  # each run's train.log gets that run's records only
            train(run.cfg, resume="auto", show_progress=show_progress)
    return dist


def step_cost(cfg: Config, num_classes: int) -> tuple[int, int]:
    """Parameters and training-step FLOPs (batch ``COST_BATCH``, math attention, CPU) of the model
    ``cfg`` describes, with random weights."""
    cfg = copy.deepcopy(cfg)
    cfg.model.pretrained, cfg.model.pretrained_path = False, None
    model = build_model(cfg, num_classes).train()
    size = cfg.data.img_size
    images = torch.randn(COST_BATCH, 3, size, size)
    labels = torch.arange(COST_BATCH) % num_classes
    flops = count_flops(lambda: dcal_loss(model, images, labels).backward())
    return sum(p.numel() for p in model.parameters()), flops


def _records(runs: Sequence[PlannedRun], baseline: Config) -> list[RunRecord]:
    """One record per run (each has trained at least one epoch by now), with its variant's cost."""
    records, costs = [], {}
    for run in runs:
        state = run_state(run)
        if not costs:
            costs[BASELINE] = step_cost(baseline, state.num_classes)
        if run.variant not in costs:
            costs[run.variant] = step_cost(run.cfg, state.num_classes)
        params, flops = costs[run.variant]
        ratio = flops / costs[BASELINE][1]
        where = (run.run_dir, run.cfg, state.eval_split, state.epochs_done)
        records.append(read_run(run.variant, run.seed, *where, params, ratio))
    return records


def run_ablation(
    base: Config,
    variant_names: Sequence[str],
    seeds: Sequence[int],
    name: str,
    show_progress: bool = True,
    command: str | None = None,
) -> AblationReport | None:
    """Train every variant x seed of ``base`` under ``<run.output_dir>/<name>/`` and write
    ``ablation.csv``, ``ablation.md`` and ``ablation.png`` there.

    Args:
        base: the experiment (config file and --set overrides applied).
        variant_names: built-in variants or those of ``base.ablation.variants``.
        seeds: ``train.seed`` of each run of a variant.
        name: the ablation's directory name under ``base.run.output_dir``.
        show_progress: progress bars while training.
        command: the command line, written into ablation.md.

    Returns:
        The report on rank 0; None on the other torchrun processes.
    """
    if not seeds:
        raise UsageError("an ablation needs at least one seed")
    variants = select_variants(variant_names, base.ablation.variants)
    ablation_dir = Path(base.run.output_dir) / name
    runs = plan_runs(base, variants, seeds, ablation_dir)
    sa = {BASELINE: known_variants(base.ablation.variants)[BASELINE]}
    baseline = plan_runs(base, sa, seeds[:1], ablation_dir)
    if not train_runs(runs, show_progress).is_main:
        return None
    return write_report(_records(runs, baseline[0].cfg), ablation_dir, name, command)
