"""Named ablation variants: override sets applied on top of an experiment's config.

A variant lists only the keys it changes; everything else comes from the config file and
``--set``. The built-in ones are the paper's ablations; a config adds its own under
``ablation.variants`` (name -> {dotted.key: value}), which may also redefine a built-in name.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import Config, ConfigError, set_value, validate

BASELINE = "sa"  # what every difference and cost ratio is taken against
BUILTIN_VARIANTS: dict[str, dict[str, Any]] = {
    "sa": {"model.glca": False, "model.pwca": False},
    "glca": {"model.glca": True, "model.pwca": False},
    "pwca": {"model.glca": False, "model.pwca": True},
    "dcal": {"model.glca": True, "model.pwca": True},
    "dcal-local": {"model.glca": True, "model.pwca": True, "model.glca_readout": "local"},
    "dcal-random": {"model.glca": True, "model.pwca": True, "model.glca_select": "random"},
    "dcal-localkv": {"model.glca": True, "model.pwca": True, "model.glca_kv": "local"},
}
# Keys the ablation sets itself for every run; a variant that set them would break the layout.
RESERVED = ("train.seed", "run.name", "run.output_dir")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")  # safe as a directory name


def check_name(name: str, what: str) -> None:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"{what} {name!r} must be a plain file name: letters, digits and _ . + - (not first)"
        )


def known_variants(extra: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The built-in variants and those of a config's ``ablation.variants`` (which win)."""
    known = copy.deepcopy(BUILTIN_VARIANTS)
    for name, overrides in extra.items():
        check_name(str(name), "ablation.variants: the variant name")
        if not isinstance(overrides, dict) or not all(isinstance(key, str) for key in overrides):
            raise ConfigError(
                f"ablation.variants.{name} must map dotted config keys to values, "
                f"e.g. {{model.glca: false}}; got {overrides!r}"
            )
        for key in overrides:
            if key in RESERVED or key.startswith("ablation."):
                raise ConfigError(
                    f"ablation.variants.{name} sets {key}, which the ablation sets itself "
                    f"(--seeds, --name, run.output_dir); drop it"
                )
        known[str(name)] = dict(overrides)
    return known


def select_variants(names: Sequence[str], extra: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``names`` (in order, repeats dropped) with their overrides; an unknown name is an error
    that lists the known ones."""
    known = known_variants(extra)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ConfigError(
            f"unknown variant(s) {unknown}; known variants: {sorted(known)} (add your own under "
            "ablation.variants in the config: name -> {dotted.key: value})"
        )
    return {name: known[name] for name in dict.fromkeys(names)}


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_s{seed}"


def variant_config(
    base: Config, variant: str, overrides: Mapping[str, Any], seed: int, ablation_dir: Path
) -> Config:
    """``base`` with the variant's overrides, seed ``seed`` and the run directory
    ``ablation_dir/<variant>_s<seed>``; validated. An unknown key is the config's usual error
    listing the valid keys, naming the variant."""
    cfg = copy.deepcopy(base)
    for key, value in overrides.items():
        set_value(cfg, key, value, source=f"variant {variant!r}")
    cfg.train.seed = seed
    cfg.run.output_dir = str(ablation_dir)
    cfg.run.name = run_name(variant, seed)
    return validate(cfg)
