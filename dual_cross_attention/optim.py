"""Learning-rate rule, AdamW parameter groups and the warmup + cosine schedule.

The LR is a pure function of the optimizer step, so a resumed run sets exactly the LR an
uninterrupted run would have set, with no scheduler state to drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

SQRT_REFERENCE_BATCH = 16  # sqrt rule: base_lr is the LR at effective batch 16 (the paper's batch)
LINEAR_REFERENCE_BATCH = 512  # the paper's rule: lr = 5e-4 / 512 x batch


def scaled_lr(base_lr: float, effective_batch: int, rule: str) -> tuple[float, str]:
    """The peak LR for ``effective_batch`` (batch x accumulation x processes) and a sentence
    saying how it was obtained, for the run log."""
    if rule == "sqrt":
        lr = base_lr * math.sqrt(effective_batch / SQRT_REFERENCE_BATCH)
        why = f"sqrt scaling: {base_lr:g} x sqrt({effective_batch}/{SQRT_REFERENCE_BATCH})"
    elif rule == "linear":
        lr = base_lr * effective_batch / LINEAR_REFERENCE_BATCH
        why = f"linear scaling (paper rule): {base_lr:g} x {effective_batch}/{LINEAR_REFERENCE_BATCH}"
    elif rule == "none":
        lr, why = base_lr, "no scaling: base_lr as given"
    else:
        raise ValueError(f"train.lr_scaling must be sqrt, linear or none, got '{rule}'")
    return lr, f"{why} = {lr:.4g}"


def lr_at_step(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float) -> float:
    """Linear warmup to ``peak_lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at
    ``total_steps``. ``step`` counts optimizer steps from 0; the first step already gets a
    non-zero LR (peak / warmup_steps) so no step is wasted."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """Warmup + cosine over a run's optimizer steps; ``schedule(step)`` is the LR for that step."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        return lr_at_step(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def no_weight_decay(name: str, param: nn.Parameter) -> bool:
    """Norms, biases, tokens, position embeddings and the (1-D) loss weights are not decayed:
    decaying them pulls them towards zero for no regularising benefit."""
    leaf = name.rsplit(".", 1)[-1]
    return param.ndim <= 1 or leaf in ("cls_token", "dist_token", "reg_token", "pos_embed")


def parameter_groups(modules: dict[str, nn.Module], weight_decay: float) -> list[dict]:
    """Two AdamW groups over all trainable parameters of ``modules`` (name prefix -> module)."""
    decay, plain = [], []
    for prefix, module in modules.items():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            (plain if no_weight_decay(f"{prefix}.{name}", param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
