"""Typed, strict experiment configuration: dataclasses, YAML files, dotted CLI overrides.

Unknown keys and wrong types are errors that list the valid keys, because a misspelt key that
is silently ignored trains the wrong experiment for days.
"""

from __future__ import annotations

import copy
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError


class ConfigError(UsageError):
    """A config file or override does not fit the schema; the message says how to fix it."""


@dataclass
class DataConfig:
    dataset: str = (
        "synthetic"  # FGVC: cub | cars | aircraft | folder | synthetic[-hard]; Re-ID: REID_DATASETS
    )
    root: str = "data/demo"
    resize_size: int = 550  # FGVC: resize before the crop; Re-ID resizes straight to img_size
    img_size: int | list = 448  # side of the square input; Re-ID: [height, width] (e.g. [256, 128])
    num_workers: int = 2
    val_fraction: float = 0.0  # carve a stratified validation split out of train (0: none)
    val_seed: int = 0  # seed of that split, apart from train.seed so the split stays put across runs
    skip_corrupt: bool = False
    eval_batch_size: int | None = None  # default: 2 x train.batch_size
    level: str = "variant"  # aircraft: variant | family | manufacturer
    crop_banner: bool = True  # aircraft: drop the 20 px copyright banner
    hflip: bool = True  # random horizontal flip in training (off for text, digits, chirality)
    mean: list | None = None  # per-channel input mean; null: the backbone's pretrained_cfg
    std: list | None = None  # per-channel input std; null: the backbone's pretrained_cfg


@dataclass
class ModelConfig:
    backbone: str = "vit_base_patch16_224.augreg_in21k"
    backbone_kwargs: dict = field(default_factory=dict)
    pretrained: bool = True
    pretrained_path: str | None = None
    top_ratio: float = 0.1
    glca: bool = True
    pwca: bool = True
    glca_readout: str = "cls"  # cls | local | cls+local: what GLCA's head reads
    glca_select: str = "rollout"  # rollout | last | random: how GLCA's local patches are picked
    glca_kv: str = "global"  # global | local: GLCA's keys/values, all tokens or prefix + local ones
    pwca_blocks: int | str = "all"  # all | T in [0, depth]: PWCA in the last T blocks only
    drop_path_rate: float = 0.1
    grad_checkpointing: bool = False
    init_from: str | None = None  # start from a DCAL checkpoint's weights (no resume; new classes: new heads)


@dataclass
class TrainConfig:
    epochs: int = 100
    batch_size: int = 2
    gradient_accumulation_steps: int = 8
    base_lr: float = 5e-4
    lr_scaling: str = "sqrt"  # sqrt: base_lr*sqrt(B/16) | linear: base_lr*B/512 (paper) | none
    warmup_epochs: float = 5.0
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    clip_grad: float | None = 1.0  # max global grad norm; null disables clipping
    label_smoothing: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd (sgd: the paper's Re-ID optimiser)
    momentum: float = 0.9  # sgd momentum
    precision: str = "auto"  # auto (bf16 on CUDA that supports it, else fp32) | bf16 | fp16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    empty_cache_every: int = 50  # optimizer steps between torch.cuda.empty_cache() calls; 0: never
    max_bad_steps: int = 5  # consecutive non-finite steps before training stops
    checkpoint_every: int = 0  # also keep checkpoints/epoch_<N>.pt every N epochs; 0: only last/best
    keep_checkpoints: int | None = None  # keep only the newest K epoch_<N>.pt; null: all
    select_on_test: bool = False  # without a val split, pick best.pt on test top-1 (else: the last epoch)
    select_metric: str = "auto"  # best.pt by: auto (FGVC top1, Re-ID mAP) | top1 (Re-ID: rank-1) | mAP | auc


@dataclass
class ReIDConfig:
    """Object re-identification (``data.dataset`` one of ``REID_DATASETS``)."""

    identities_per_batch: int = 16  # P of a PK batch; train.batch_size must be P x K per process
    images_per_identity: int = 4  # K (identities with fewer images are drawn with replacement)
    triplet_margin: float = 0.3  # batch-hard triplet margin
    soft_margin: bool = False  # softplus triplet instead of the margin
    bnneck: bool = True  # batch norm between feature and classifier (triplet before, CE after it)
    distance: str = "cosine"  # cosine | euclidean, for ranking
    rerank: bool = False  # k-reciprocal re-ranking when evaluating
    include_val: bool = True  # msmt17: train on list_train + list_val, as is customary
    camera_regex: str | None = None  # reid_folder: a regex whose one group is the camera id
    pad: int = 10  # train: pad by this many px, then random-crop back to img_size
    erasing: float = 0.5  # train: probability of random erasing


@dataclass
class VerificationConfig:
    """Pair verification on the Re-ID embedding (``verification/``): how a run draws its pairs."""

    pairs_seed: int = 0  # seeds the drawing of the run's validation and test pairs
    max_positives_per_identity: int | None = 10  # same-identity pairs drawn per identity; null: all
    num_negatives: int | None = None  # different-identity pairs per list; null: as many as positives
    hard_negatives: str | None = None  # CSV identity_a,identity_b of look-alikes: negatives only from them
    far_targets: list = field(default_factory=lambda: [1e-1, 1e-2, 1e-3])  # FARs that TAR is reported at


def _check_verification(cfg: Config) -> None:
    v = cfg.verification
    for key in ("max_positives_per_identity", "num_negatives"):
        value = getattr(v, key)
        if value is not None and value < 1:
            raise ConfigError(f"verification.{key} must be >= 1 or null, got {value}")
    # YAML reads 1e-3 (no dot) as a string: accept any number written as one.
    targets = [_coerce(f, float, "verification.far_targets") for f in v.far_targets]
    if not targets or not all(0 < f < 1 for f in targets):
        raise ConfigError(f"verification.far_targets must be FARs in (0, 1), got {v.far_targets!r}")
    v.far_targets = targets
    metric = cfg.train.select_metric
    if metric == "mAP" and cfg.task != "reid":
        raise ConfigError("train.select_metric: mAP is a Re-ID metric; FGVC runs select on top1 (or auto)")
    if metric == "auc" and (cfg.task != "reid" or cfg.data.val_fraction == 0):
        raise ConfigError(
            "train.select_metric: auc is the AUC of validation pairs drawn from validation identities: it "
            "needs a Re-ID dataset and data.val_fraction > 0 (whole identities held out of train); got "
            f"data.dataset={cfg.data.dataset}, data.val_fraction={cfg.data.val_fraction}"
        )


@dataclass
class LossConfig:
    weighting: str = "uncertainty"  # uncertainty (learned, Kendall et al.) | fixed
    init_std: float = 0.1  # std of the random init of the uncertainty weights w_k (0: zeros)
    clamp: float | None = 1.0  # keep each w_k in [-clamp, clamp]; null: unbounded
    weights: dict = field(default_factory=lambda: {"sa": 1.0, "glca": 1.0, "pwca": 1.0})  # for fixed


@dataclass
class RunConfig:
    name: str = "demo"
    output_dir: str = "runs"
    tensorboard: bool = False
    wandb: bool = False  # also log metrics and curves.png to Weights & Biases (pip install wandb)
    wandb_project: str = "dcal"  # the W&B project of run.wandb
    log_every: int = 10  # optimizer steps between progress-bar updates
    stop_after_epochs: int | None = None  # stop cleanly after this many epochs in this invocation


@dataclass
class LRFindConfig:
    start: float = 1e-7  # first LR of the exponential sweep
    end: float = 1.0  # last LR
    steps: int = 100  # optimizer steps of the sweep
    smoothing: float = 0.98  # beta of the loss's exponential moving average
    diverge_factor: float = 4.0  # stop once the smoothed loss exceeds this multiple of its minimum


@dataclass
class EvalConfig:
    """How a run is evaluated, in training and by evaluate.py / predict.py (``--tta`` overrides)."""

    tta: str = "none"  # none | flip: average the image and its mirror (FGVC probabilities, Re-ID features)


@dataclass
class AblationConfig:
    name: str | None = None  # ablate.py: runs/<name>/ (default: the config file's stem)
    variants: dict = field(default_factory=dict)  # extra variants: {name: {dotted.key: value}}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    run: RunConfig = field(default_factory=RunConfig)
    lr_find: LRFindConfig = field(default_factory=LRFindConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    reid: ReIDConfig = field(default_factory=ReIDConfig)
    verification: VerificationConfig = field(default_factory=VerificationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def task(self) -> str:
        """``reid`` for the Re-ID datasets, else ``fgvc``: decided by the dataset alone."""
        return "reid" if self.data.dataset in REID_DATASETS else "fgvc"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FGVC_DATASETS = ("cub", "cars", "aircraft", "folder", "synthetic", "synthetic-hard")
REID_DATASETS = ("market1501", "dukemtmc", "msmt17", "veri776", "reid_folder", "synthetic-reid")
CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("data", "dataset"): FGVC_DATASETS + REID_DATASETS,
    ("reid", "distance"): ("cosine", "euclidean"),
    ("train", "optimizer"): ("adamw", "sgd"),
    ("train", "select_metric"): ("auto", "top1", "mAP", "auc"),
    ("data", "level"): ("variant", "family", "manufacturer"),
    ("model", "glca_readout"): ("cls", "local", "cls+local"),
    ("model", "glca_select"): ("rollout", "last", "random"),
    ("model", "glca_kv"): ("global", "local"),
    ("train", "lr_scaling"): ("sqrt", "linear", "none"),
    ("train", "precision"): ("auto", "bf16", "fp16", "fp32"),
    ("loss", "weighting"): ("uncertainty", "fixed"),
    ("eval", "tta"): ("none", "flip"),
}
POSITIVE = {
    ("data", "resize_size"),
    ("reid", "identities_per_batch"),
    ("reid", "images_per_identity"),
    ("train", "epochs"),
    ("train", "batch_size"),
    ("train", "gradient_accumulation_steps"),
    ("train", "max_bad_steps"),
    ("run", "log_every"),
    ("lr_find", "start"),
    ("lr_find", "end"),
    ("lr_find", "steps"),
}
NON_NEGATIVE = {
    ("data", "num_workers"),
    ("train", "base_lr"),
    ("train", "warmup_epochs"),
    ("train", "min_lr"),
    ("train", "weight_decay"),
    ("train", "empty_cache_every"),
    ("train", "checkpoint_every"),
    ("loss", "init_std"),
    ("reid", "triplet_margin"),
    ("reid", "pad"),
    ("train", "momentum"),
}


def _section_types(section_cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in fields(section_cls)}


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Return ``value`` as type ``tp`` or raise; only lossless conversions (int -> float, and
    numeric strings such as YAML's ``5e-4`` -> float) are made."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r}")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int and is_number and isinstance(value, int):
        return value
    if tp is float and is_number:
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (bool, str, dict, list) and isinstance(value, tp):
        return tp(value) if tp in (dict, list) else value
    raise ConfigError(f"{where}: expected {_describe(tp)}, got {value!r} ({type(value).__name__})")


def _check_section(cfg: Config, name: str) -> None:
    section = getattr(cfg, name)
    for key in (f.name for f in fields(section)):
        value = getattr(section, key)
        where = f"{name}.{key}"
        if (name, key) in CHOICES and value not in CHOICES[(name, key)]:
            raise ConfigError(f"{where} must be one of {list(CHOICES[(name, key)])}, got {value!r}")
        if (name, key) in POSITIVE and value <= 0:
            raise ConfigError(f"{where} must be > 0, got {value!r}")
        if (name, key) in NON_NEGATIVE and value < 0:
            raise ConfigError(f"{where} must be >= 0, got {value!r}")


def validate(cfg: Config) -> Config:
    """Check values and the relations between them; return ``cfg`` for chaining."""
    for name in (f.name for f in fields(cfg)):
        _check_section(cfg, name)
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}")
    if not 0.0 < cfg.model.top_ratio <= 1.0:
        raise ConfigError(f"model.top_ratio must be in (0, 1], got {cfg.model.top_ratio}")
    blocks = cfg.model.pwca_blocks
    if blocks != "all" and not (isinstance(blocks, int) and blocks >= 0):
        # the upper bound, the backbone's depth, is checked when the model is built
        raise ConfigError(
            f"model.pwca_blocks must be 'all' or an integer >= 0 (at most the depth), got {blocks!r}"
        )
    _check_verification(cfg)
    if cfg.task == "reid":
        _check_reid(cfg)
    elif not isinstance(cfg.data.img_size, int) or cfg.data.img_size <= 0:
        raise ConfigError(
            f"data.img_size must be a positive integer (the side of the square crop) for {cfg.data.dataset}, "
            f"got {cfg.data.img_size!r}; [height, width] is for the Re-ID datasets {list(REID_DATASETS)}"
        )
    elif cfg.data.resize_size < cfg.data.img_size:
        raise ConfigError(
            f"data.resize_size ({cfg.data.resize_size}) must be >= data.img_size ({cfg.data.img_size}): "
            "images are resized, then cropped to img_size"
        )
    if cfg.model.pwca and cfg.train.batch_size < 2:
        raise ConfigError(
            "model.pwca pairs each image with another of the same batch, so train.batch_size must be >= 2 "
            f"(got {cfg.train.batch_size}); raise it or set model.pwca: false"
        )
    if cfg.train.min_lr > cfg.train.base_lr:
        raise ConfigError(f"train.min_lr ({cfg.train.min_lr}) is above train.base_lr ({cfg.train.base_lr})")
    if cfg.loss.clamp is not None and cfg.loss.clamp <= 0:
        raise ConfigError(f"loss.clamp must be > 0 or null, got {cfg.loss.clamp}")
    unknown = set(cfg.loss.weights) - {"sa", "glca", "pwca"}
    if unknown:
        raise ConfigError(f"loss.weights has unknown branches {sorted(unknown)}; valid: sa, glca, pwca")
    if not cfg.lr_find.start < cfg.lr_find.end:
        f = cfg.lr_find
        raise ConfigError(f"lr_find.start ({f.start}) must be below lr_find.end ({f.end})")
    if not 0.0 <= cfg.lr_find.smoothing < 1.0:
        raise ConfigError(f"lr_find.smoothing must be in [0, 1), got {cfg.lr_find.smoothing}")
    if cfg.lr_find.diverge_factor <= 1.0:
        raise ConfigError(f"lr_find.diverge_factor must be > 1, got {cfg.lr_find.diverge_factor}")
    for key in ("mean", "std"):
        value = getattr(cfg.data, key)
        if value is not None and (len(value) != 3 or not all(isinstance(v, (int, float)) for v in value)):
            raise ConfigError(f"data.{key} must be three numbers (R, G, B) or null, got {value!r}")
    if (cfg.data.mean is None) != (cfg.data.std is None):
        raise ConfigError("set data.mean and data.std together (or neither: the backbone's statistics)")
    if cfg.train.keep_checkpoints is not None and cfg.train.keep_checkpoints < 1:
        raise ConfigError(f"train.keep_checkpoints must be >= 1 or null, got {cfg.train.keep_checkpoints}")
    if cfg.run.stop_after_epochs is not None and cfg.run.stop_after_epochs <= 0:
        raise ConfigError(f"run.stop_after_epochs must be > 0 or null, got {cfg.run.stop_after_epochs}")
    if cfg.model.init_from is not None and not cfg.model.init_from.strip():
        raise ConfigError("model.init_from must be a checkpoint path or null, got an empty string")
    return cfg


def image_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    """``data.img_size`` as (height, width): an int is a square."""
    if isinstance(img_size, int):
        return img_size, img_size
    return int(img_size[0]), int(img_size[1])


def _check_reid(cfg: Config) -> None:
    size = cfg.data.img_size
    square = isinstance(size, int) and not isinstance(size, bool)
    pair = isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    if not (square and size > 0) and not pair:
        raise ConfigError(f"data.img_size must be [height, width] (e.g. [256, 128]) or one int, got {size!r}")
    r = cfg.reid
    if cfg.train.batch_size != r.identities_per_batch * r.images_per_identity:
        raise ConfigError(
            f"Re-ID batches are P identities x K images: train.batch_size ({cfg.train.batch_size}) must "
            f"equal reid.identities_per_batch x reid.images_per_identity = {r.identities_per_batch} x "
            f"{r.images_per_identity} = {r.identities_per_batch * r.images_per_identity} (per process)"
        )
    if r.identities_per_batch < 2 or r.images_per_identity < 2:
        raise ConfigError(
            "batch-hard triplet mining needs positives and negatives in every batch: "
            "reid.identities_per_batch and reid.images_per_identity must be >= 2, got "
            f"{r.identities_per_batch} and {r.images_per_identity}"
        )
    if not 0.0 <= r.erasing <= 1.0:
        raise ConfigError(f"reid.erasing is a probability in [0, 1], got {r.erasing}")


def set_value(cfg: Config, dotted: str, value: Any, source: str) -> None:
    """Set ``section.key`` (or ``section.mapping.key``) of ``cfg`` in place, coercing ``value`` to the
    key's type; an unknown section or key is an error that lists the valid ones, naming ``source``."""
    parts = dotted.split(".")
    sections = [f.name for f in fields(cfg)]
    if parts[0] not in sections:
        raise ConfigError(f"{source}: unknown section '{parts[0]}' in '{dotted}'; valid sections: {sections}")
    section = getattr(cfg, parts[0])
    types_ = _section_types(type(section))
    if len(parts) < 2 or parts[1] not in types_:
        key = parts[1] if len(parts) > 1 else ""
        raise ConfigError(
            f"{source}: unknown key '{key}' in section '{parts[0]}'; valid keys: {sorted(types_)}"
        )
    name = parts[1]
    if len(parts) == 2:
        setattr(section, name, _coerce(value, types_[name], f"{source}: {parts[0]}.{name}"))
    elif types_[name] is dict and len(parts) == 3:
        getattr(section, name)[parts[2]] = value  # e.g. model.backbone_kwargs.depth=6
    else:
        raise ConfigError(f"{source}: '{dotted}' is too deep; {parts[0]}.{name} is not a mapping")


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a validated Config from nested dicts (a YAML file or a checkpoint's copy)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    cfg = Config()
    for section, values in raw.items():
        if not isinstance(values, dict):
            valid = [f.name for f in fields(cfg)]
            if section not in valid:
                raise ConfigError(f"{source}: unknown section '{section}'; valid sections: {valid}")
            raise ConfigError(f"{source}: section '{section}' must be a mapping, got {values!r}")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value, source)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``train.batch_size=4`` -> ("train.batch_size", 4); values are parsed as YAML
    (ints, floats, bools, null, lists, mappings)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': value is not valid YAML ({err})") from err
    return key.strip(), value


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A validated copy of ``cfg`` with ``--set`` style ``section.key=value`` overrides applied in
    order; an error names the override that caused it."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        key, value = parse_override(text)
        set_value(cfg, key, value, source=f"--set {text}")
    return validate(cfg)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- ``--set`` overrides, then validation."""
    raw: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"config file not found: {file}")
        with file.open() as handle:
            raw = yaml.safe_load(handle) or {}
    return apply_overrides(from_dict(raw, source=str(path) if path else "config"), overrides)
