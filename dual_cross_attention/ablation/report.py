"""What an ablation writes: ablation.csv (one row per run), ablation.md (one row per variant)
and ablation.png (top-1 per epoch, mean and min-max band over seeds per variant).

All accuracies come from the runs' metrics.csv, i.e. from the run's evaluation split: the
validation carve-out when ``data.val_fraction > 0``, else test (the csv's ``eval_split`` column
and the table's header say which).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.ticker import MaxNLocator

from ..config import Config
from ..evaluation.metrics import column_name
from ..visualize import _new_figure, _save
from .variants import BASELINE

MODES = ("sa", "glca", "sa+glca")
COLUMNS = [
    "variant", "seed", "eval_split", "epochs_done", "epochs",
    *(f"final_eval_top1_{column_name(m)}" for m in MODES),
    *(f"best_eval_top1_{column_name(m)}" for m in MODES),
    "best_epoch", "train_seconds", "params", "train_flops_vs_sa", "run_dir",
]  # fmt: skip
PLOT_INCHES = (9.0, 5.5)


@dataclass
class RunRecord:
    row: dict[str, Any]  # the run's ablation.csv row
    curve: pd.Series  # the selection top-1 (sa+glca, or sa without GLCA) per epoch


@dataclass
class AblationReport:
    out_dir: Path
    runs: pd.DataFrame  # ablation.csv
    markdown: str  # ablation.md


def read_run(
    variant: str,
    seed: int,
    run_dir: Path,
    cfg: Config,
    eval_split: str,
    epochs_done: int,
    params: int,
    flops_ratio: float,
) -> RunRecord:
    """The csv row and curve of one run from its metrics.csv, up to the epoch its last.pt holds.

    ``final_eval_top1_<mode>`` is the last epoch's ``eval_top1_<mode>``, ``best_eval_top1_<mode>``
    its maximum over epochs and ``best_epoch`` the (first) epoch of the maximum of the selection
    top-1 (on the test split both are picked on test: optimistic; the final numbers are not).
    """
    frame = pd.read_csv(run_dir / "metrics.csv")
    frame = frame[frame["epoch"] < min(epochs_done, cfg.train.epochs)]
    selection = f"eval_top1_{column_name('sa+glca' if cfg.model.glca else 'sa')}"
    row: dict[str, Any] = {
        "variant": variant,
        "seed": seed,
        "eval_split": eval_split,
        "epochs_done": len(frame),
        "epochs": cfg.train.epochs,
    }
    for mode in MODES:
        values = frame[f"eval_top1_{column_name(mode)}"]
        row[f"final_eval_top1_{column_name(mode)}"] = values.iloc[-1]
        row[f"best_eval_top1_{column_name(mode)}"] = values.max()
    row.update(
        best_epoch=int(frame.loc[frame[selection].idxmax(), "epoch"]),
        train_seconds=float(frame["epoch_time_s"].sum()),
        params=params,
        train_flops_vs_sa=flops_ratio,
        run_dir=str(run_dir),
    )
    return RunRecord(row, frame.set_index("epoch")[selection])


def _mean_std(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    if len(values) == 1:
        return f"{values.mean():.2f}"
    return f"{values.mean():.2f} ± {values.std():.2f}"


def _signed(values: pd.Series) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    text = f"{values.mean():+.2f}"
    return text if len(values) == 1 else f"{text} ± {values.std():.2f}"


def _describe(values: pd.Series) -> str:
    return ", ".join(str(v) for v in dict.fromkeys(values))


def markdown_table(runs: pd.DataFrame) -> str:
    """One row per variant over its finished runs: mean ± std (sample std) over seeds of each
    mode's final top-1, the per-seed difference to ``sa``'s SA top-1, parameters, FLOPs."""
    finished = runs[runs["epochs_done"] >= runs["epochs"]]
    baseline = finished[finished["variant"] == BASELINE].set_index("seed")["final_eval_top1_sa"]
    header = ["variant", "seeds", *MODES, "Δ sa", "Δ sa+glca", "params", "train FLOPs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, group in finished.groupby("variant", sort=False):
        by_seed = group.set_index("seed")
        cells = [f"`{variant}`", str(len(group))]
        cells += [_mean_std(group[f"final_eval_top1_{column_name(m)}"]) for m in MODES]
        for mode in ("sa", "sa+glca"):
            # paired by seed: only seeds both the variant and the baseline finished
            cells.append(_signed((by_seed[f"final_eval_top1_{column_name(mode)}"] - baseline).dropna()))
        first = group.iloc[0]
        cells += [f"{first['params'] / 1e6:.3g}M", f"{first['train_flops_vs_sa']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(runs: pd.DataFrame, name: str, command: str | None) -> str:
    """ablation.md: what the numbers are, the table, and the runs not finished yet."""
    text = [f"# Ablation `{name}`", ""]
    if command:
        text += [f"    {command}", ""]
    split, epochs = _describe(runs["eval_split"]), _describe(runs["epochs"])
    text += [
        f"Final top-1 (%) on the {split} split (epochs: {epochs}), mean ± std over seeds (sample "
        "standard deviation). Δ: difference to the SA top-1 of "
        f"`{BASELINE}`, mean ± std over the seeds both finished (paired by seed). params: parameters of "
        f"the model; train FLOPs: one training step, relative to `{BASELINE}`. Per run, with the best "
        "epoch and the training time: ablation.csv.",
        "",
        markdown_table(runs),
    ]
    unfinished = runs[runs["epochs_done"] < runs["epochs"]]
    if not unfinished.empty:
        listed = ", ".join(
            f"{r.variant} seed {r.seed} ({r.epochs_done} of {r.epochs} epochs)"
            for r in unfinished.itertuples()
        )
        text += ["", f"Not finished, so not in the table (rerun the same command to continue): {listed}."]
    if BASELINE not in set(runs["variant"]):
        text += ["", f"No Δ without the `{BASELINE}` variant: add it to --variants."]
    return "\n".join(text) + "\n"


def plot_curves(records: list[RunRecord], name: str, eval_split: str, out_png: Path) -> Path:
    """Selection top-1 per epoch: the mean over seeds as a line, min to max as a band, per variant."""
    figure = _new_figure(PLOT_INCHES)
    ax = figure.subplots()
    variants = dict.fromkeys(r.row["variant"] for r in records)
    for index, variant in enumerate(variants):
        curves = pd.concat([r.curve for r in records if r.row["variant"] == variant], axis=1)
        epochs, colour = curves.index.to_numpy(), f"C{index % 10}"
        ax.plot(epochs, curves.mean(axis=1), color=colour, marker="o", markersize=3,
                label=f"{variant} ({curves.shape[1]} seeds)")  # fmt: skip
        ax.fill_between(epochs, curves.min(axis=1), curves.max(axis=1), color=colour, alpha=0.2, linewidth=0)
    ax.set_title(f"{name}: {eval_split} top-1 (sa+glca; sa where GLCA is off), mean and min-max over seeds")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.1, top=0.92)
    return _save(figure, out_png)


def write_report(records: list[RunRecord], out_dir: Path, name: str, command: str | None) -> AblationReport:
    """Write ablation.csv, ablation.md and ablation.png into ``out_dir``."""
    runs = pd.DataFrame([r.row for r in records], columns=COLUMNS)
    runs.to_csv(out_dir / "ablation.csv", index=False)
    markdown = markdown_report(runs, name, command)
    (out_dir / "ablation.md").write_text(markdown)
    plot_curves(records, name, _describe(runs["eval_split"]), out_dir / "ablation.png")
    return AblationReport(out_dir=out_dir, runs=runs, markdown=markdown)
