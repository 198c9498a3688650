"""Plain-words warnings about a run that is going wrong, checked once per epoch.

Each check looks at the metrics history (one dict per epoch, as written to metrics.csv) and
returns a sentence a person can act on, or nothing.
"""

from __future__ import annotations

import math

FALLING_EPOCHS = 3  # train accuracy falling this many epochs in a row is worth a warning
WEIGHT_MOVE_MIN = 1e-3  # uncertainty weights that moved less than this have not learned
NEAR_LIMIT = 0.9  # share of the device's memory reserved at the peak that is worth a warning


def glca_near_chance(history: list[dict], num_classes: int, warmup_epochs: float) -> str | None:
    row = history[-1]
    glca = row.get("eval_top1_glca")
    if glca is None or math.isnan(glca) or row["epoch"] + 1 <= warmup_epochs:
        return None
    chance = 100.0 / num_classes
    if glca >= min(2.0 * chance, chance + 10.0):  # with few classes, twice chance is not "near"
        return None
    return (
        f"GLCA accuracy is {glca:.1f}% after warmup, near chance ({chance:.1f}%). The GLCA branch is not "
        "learning: check the LR printed at start, model.top_ratio, and that the loss weights are moving."
    )


def weights_not_moving(history: list[dict], initial: dict[str, float]) -> str | None:
    if len(history) < 2 or not initial:
        return None
    row = history[-1]
    moved = {b: abs(row[f"weight_{b}"] - w0) for b, w0 in initial.items()}
    if max(moved.values()) >= WEIGHT_MOVE_MIN:
        return None
    now = ", ".join(f"{b}={row[f'weight_{b}']:.4f}" for b in initial)
    return (
        f"the uncertainty loss weights have not moved from their start ({now}) after {len(history)} epochs: "
        "check that the LR is not tiny and that loss.clamp is not pinning them."
    )


def train_accuracy_falling(history: list[dict]) -> str | None:
    if len(history) <= FALLING_EPOCHS:
        return None
    accs = [row["train_acc_sa"] for row in history[-FALLING_EPOCHS - 1 :]]
    if not all(later < earlier for earlier, later in zip(accs, accs[1:], strict=False)):
        return None
    trail = " -> ".join(f"{a:.1f}%" for a in accs)
    return (
        f"SA training accuracy has fallen {FALLING_EPOCHS} epochs in a row ({trail}): the LR may be too "
        "high for this batch size (see the LR rule at start), or the data/labels changed under the run."
    )


def memory_near_limit(history: list[dict], device_mb: float | None) -> str | None:
    """Reserved, not allocated, memory is what runs out: the caching allocator holds more than
    the tensors need (cache, fragmentation), and an epoch that peaks close to the device's
    memory can fail with out-of-memory on a later, larger step."""
    row = history[-1]
    reserved = row.get("peak_reserved_mb")
    if device_mb is None or reserved is None or reserved <= NEAR_LIMIT * device_mb:
        return None
    return (
        f"epoch {row['epoch']} peaked at {reserved:.0f} MiB reserved ({row['peak_mem_mb']:.0f} MiB "
        f"allocated) of the device's {device_mb:.0f} MiB: close to out-of-memory. Set "
        "model.grad_checkpointing: true, or lower train.batch_size and raise "
        "train.gradient_accumulation_steps to keep the effective batch."
    )


def health_warnings(
    history: list[dict],
    num_classes: int,
    warmup_epochs: float,
    initial_weights: dict[str, float],
    device_mb: float | None = None,
) -> list[str]:
    """All warnings that apply after the latest epoch (``device_mb``: the GPU's memory, None on a CPU)."""
    checks = (
        glca_near_chance(history, num_classes, warmup_epochs),
        weights_not_moving(history, initial_weights),
        train_accuracy_falling(history),
        memory_near_limit(history, device_mb),
    )
    return [message for message in checks if message]
