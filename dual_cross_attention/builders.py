"""The one place where the config becomes objects: model, loss, datasets, loaders, LR schedule,
optimizer, and the bundle of them a training step needs.

Modules below this take explicit arguments and never see the config.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import timm
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .checkpoint import CheckpointError
from .config import Config, DataConfig, TrainConfig, image_hw
from .data import DataError, ImageDataset, build_dataset, build_splits
from .data.pk_sampler import PKBatchSampler
from .data.reid import ReIDSplits, build_reid_datasets, load_reid_splits
from .data.reid_transforms import build_reid_eval_transform, build_reid_train_transform
from .data.reid_val import carve_reid_validation
from .data.synthetic_reid import ReIDDemoSpec, generate_reid_demo
from .data.transforms import ImagePipeline, build_eval_transform, build_train_transform
from .distributed import DistInfo, ShardSampler, gather_from_all, main_process_first, process_device
from .errors import UsageError
from .finetune import init_from_checkpoint
from .losses import DCALLoss, ModelWithLoss, ReIDLoss
from .models import DualViT
from .optim import Schedule, parameter_groups, scaled_lr
from .runtime import grad_scaler, maybe_empty_cache, resolve_device, resolve_precision, seed_everything

_logger = logging.getLogger(__name__)


@dataclass
class DataBundle:
    train: Dataset
    eval: Dataset  # FGVC: the model-selection split; Re-ID: the query set
    eval_split: str  # "val" when a validation split exists, else "test"
    classes: list[str]  # Re-ID: the training identities (original ids), in label order
    gallery: Dataset | None = None  # Re-ID: the gallery the queries are ranked against
    reid: ReIDSplits | None = None  # Re-ID: the records, cameras and dataset version


def build_model(cfg: Config, num_classes: int) -> DualViT:
    m = cfg.model
    return DualViT(
        backbone=m.backbone,
        num_classes=num_classes,
        img_size=image_hw(cfg.data.img_size),
        pretrained=m.pretrained,
        pretrained_path=m.pretrained_path,
        top_ratio=m.top_ratio,
        glca=m.glca,
        pwca=m.pwca,
        glca_readout=m.glca_readout,
        glca_select=m.glca_select,
        glca_kv=m.glca_kv,
        pwca_blocks=m.pwca_blocks,
        drop_path_rate=m.drop_path_rate,
        grad_checkpointing=m.grad_checkpointing,
        backbone_kwargs=dict(m.backbone_kwargs),
        bnneck=cfg.task == "reid" and cfg.reid.bnneck,
    )


def build_loss(cfg: Config) -> DCALLoss:
    branches = ("sa",) + (("glca",) if cfg.model.glca else ()) + (("pwca",) if cfg.model.pwca else ())
    if cfg.task == "reid":
        extra: dict[str, Any] = dict(margin=cfg.reid.triplet_margin, soft_margin=cfg.reid.soft_margin)
        loss_class: type[DCALLoss] = ReIDLoss
    else:
        extra, loss_class = {}, DCALLoss
    return loss_class(
        branches,
        **extra,
        weighting=cfg.loss.weighting,
        init_std=cfg.loss.init_std,
        clamp=cfg.loss.clamp,
        fixed_weights=dict(cfg.loss.weights),
        label_smoothing=cfg.train.label_smoothing,
    )


def normalization(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Input mean/std: ``data.mean``/``data.std`` when set, else what the backbone was pretrained
    with (timm's pretrained_cfg for that name and tag)."""
    if cfg.data.mean is not None:
        return tuple(cfg.data.mean), tuple(cfg.data.std)
    pretrained_cfg = timm.models.get_pretrained_cfg(cfg.model.backbone)
    if pretrained_cfg is None:
        raise UsageError(
            f"timm has no pretrained_cfg for '{cfg.model.backbone}', so its input normalization is unknown: "
            "set data.mean and data.std (e.g. [0.485, 0.456, 0.406] and [0.229, 0.224, 0.225])"
        )
    return tuple(pretrained_cfg.mean), tuple(pretrained_cfg.std)


def _dataset_options(d: DataConfig) -> dict[str, Any]:
    """The keyword arguments every split of the configured dataset is loaded with."""
    options: dict[str, Any] = dict(
        val_fraction=d.val_fraction, val_seed=d.val_seed, skip_corrupt=d.skip_corrupt
    )
    if d.dataset == "aircraft":
        options.update(level=d.level, crop_banner=d.crop_banner)
    return options


def build_eval_pipeline(cfg: Config) -> ImagePipeline:
    """The deterministic resize + center-crop + normalize pipeline a run evaluates with."""
    mean, std = normalization(cfg)
    return build_eval_transform(cfg.data.img_size, cfg.data.resize_size, mean, std)


def build_reid_data(cfg: Config, split: str = "selection") -> DataBundle:
    """Train, query and gallery of a Re-ID dataset with their transforms; the built-in demo is
    generated (Market-1501 layout) on first use.

    Args:
        split: ``selection``: with ``data.val_fraction`` > 0 the query/gallery are the validation
            identities held out of train (``reid_val``), else the test ones; ``test``: always the
            dataset's test query and gallery (train is still carved, so its classes are the run's).
    """
    d, r = cfg.data, cfg.reid
    mean, std = normalization(cfg)
    layout, options = d.dataset, {}
    if d.dataset == "synthetic-reid":
        generate_reid_demo(Path(d.root), ReIDDemoSpec())
        layout = "market1501"
    elif d.dataset == "msmt17":
        options["include_val"] = r.include_val
    elif d.dataset == "reid_folder":
        options["camera_regex"] = r.camera_regex
    splits = load_reid_splits(layout, d.root, **options)
    eval_split = "test"
    if d.val_fraction > 0:
        val = carve_reid_validation(splits.train, d.val_fraction, d.val_seed)
        splits = replace(splits, train=val.train, num_train_ids=len({rec.pid for rec in val.train}))
        if split == "selection":
            splits, eval_split = replace(splits, query=val.query, gallery=val.gallery), "val"
    size = image_hw(d.img_size)
    train_transform = build_reid_train_transform(
        size, mean, std, hflip=d.hflip, pad=r.pad, erasing_p=r.erasing
    )
    datasets = build_reid_datasets(
        splits, train_transform, build_reid_eval_transform(size, mean, std), d.skip_corrupt
    )
    classes = [str(pid) for pid in sorted({rec.pid for rec in splits.train})]
    return DataBundle(
        train=datasets.train, eval=datasets.query, eval_split=eval_split, classes=classes,
        gallery=datasets.gallery, reid=splits,
    )  # fmt: skip


def build_datasets(cfg: Config) -> DataBundle:
    """Train and model-selection datasets with their transforms (val when there is one, else test)."""
    if cfg.task == "reid":
        return build_reid_data(cfg)
    d = cfg.data
    mean, std = normalization(cfg)
    splits = build_splits(
        d.dataset,
        d.root,
        build_train_transform(d.img_size, d.resize_size, mean, std, hflip=d.hflip),
        build_eval_pipeline(cfg),
        **_dataset_options(d),
    )
    evaluation, eval_split = (splits.val, "val") if splits.val is not None else (splits.test, "test")
    return DataBundle(
        train=splits.train, eval=evaluation, eval_split=eval_split, classes=list(splits.train.classes)
    )


def build_eval_split(cfg: Config, split: str) -> ImageDataset:
    """Split ``split`` of the configured dataset with the eval transform, loaded with the options
    training used (val carve-out and seed, aircraft level and banner crop, skip_corrupt), so
    'val' here is the very split the run selected its model on."""
    d = cfg.data
    return build_dataset(d.dataset, d.root, split, build_eval_pipeline(cfg), **_dataset_options(d))


def build_loaders(
    cfg: Config, data: DataBundle, device: torch.device, seed: int, dist: DistInfo
) -> tuple[DataLoader, DataLoader]:
    """Training loader (shuffled, full batches only: PWCA needs >= 2 images) and eval loader.

    Under torchrun each process gets its share: a DistributedSampler for training (the trainer
    calls ``set_epoch``), and for evaluation a sampler that hands every image to exactly one
    process, without the padding DistributedSampler would add.
    """
    batch = cfg.train.batch_size
    common = dict(num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    if data.reid is not None:  # P identities x K images per process and step
        sampler = PKBatchSampler(
            data.train.pids, cfg.reid.identities_per_batch, cfg.reid.images_per_identity, seed,
            rank=dist.rank, world_size=dist.world_size,
        )  # fmt: skip
        train = DataLoader(data.train, batch_sampler=sampler, **common)
        return train, build_eval_loader(cfg, data.eval, device, dist)
    if len(data.train) < batch * dist.world_size:
        raise DataError(
            f"the training split has {len(data.train)} images, fewer than train.batch_size={batch} x "
            f"{dist.world_size} processes"
        )
    if dist.enabled:
        sampler = DistributedSampler(
            data.train, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed, drop_last=True
        )
        train = DataLoader(data.train, batch_size=batch, sampler=sampler, drop_last=True, **common)
    else:
        generator = torch.Generator().manual_seed(seed)
        train = DataLoader(
            data.train, batch_size=batch, shuffle=True, drop_last=True, generator=generator, **common
        )
    return train, build_eval_loader(cfg, data.eval, device, dist)


def build_eval_loader(cfg: Config, dataset: Dataset, device: torch.device, dist: DistInfo) -> DataLoader:
    """In order, no drop_last, ``data.eval_batch_size`` (default 2 x ``train.batch_size``); under
    torchrun each process takes every world_size-th image, without padding, so every image is
    evaluated exactly once."""
    return DataLoader(
        dataset,
        batch_size=cfg.data.eval_batch_size or 2 * cfg.train.batch_size,
        sampler=ShardSampler(len(dataset), dist.rank, dist.world_size),
        num_workers=cfg.data.num_workers,
        pin_memory=device.type == "cuda",
    )


def start_epoch(loader: DataLoader, epoch: int, epoch_seed: int) -> None:
    """Make the epoch's shuffle (and worker seeds) a function of the epoch alone."""
    if isinstance(loader.batch_sampler, PKBatchSampler):
        loader.batch_sampler.set_epoch(epoch)
    elif isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    else:
        loader.generator.manual_seed(epoch_seed)


def effective_batch(train: TrainConfig, world_size: int) -> int:
    """Images per optimizer step over all processes: batch x accumulation x processes."""
    return train.batch_size * train.gradient_accumulation_steps * world_size


def build_schedule(train: TrainConfig, batches_per_epoch: int, world_size: int) -> tuple[Schedule, str]:
    """The warmup + cosine LR schedule of a run and a sentence for the log: the global effective
    batch, the LR rule and the LR it gives, optimizer steps per epoch, warmup and total steps.

    Args:
        batches_per_epoch: micro-batches each process takes per epoch (the last accumulation
            window of an epoch may be shorter; it is still one optimizer step).
    """
    batch = effective_batch(train, world_size)
    peak_lr, rule = scaled_lr(train.base_lr, batch, train.lr_scaling)
    steps_per_epoch = math.ceil(batches_per_epoch / train.gradient_accumulation_steps)
    schedule = Schedule(
        peak_lr, train.min_lr, round(train.warmup_epochs * steps_per_epoch), train.epochs * steps_per_epoch
    )
    processes = f" x {world_size} processes" if world_size > 1 else ""
    text = (
        f"effective batch {batch} = {train.batch_size} x {train.gradient_accumulation_steps} accumulation"
        f"{processes}; LR {peak_lr:.4g} ({rule}); {steps_per_epoch} optimizer steps/epoch, "
        f"warmup {schedule.warmup_steps}, total {schedule.total_steps}"
    )
    return schedule, text


@dataclass
class TrainingParts:
    """Everything a training step needs, built from the config (shared by training and the LR finder)."""

    device: torch.device
    amp_dtype: torch.dtype
    data: DataBundle
    model: DualViT
    criterion: DCALLoss
    step_module: torch.nn.Module  # ModelWithLoss, wrapped in DDP under torchrun
    train_loader: DataLoader
    eval_loader: DataLoader  # Re-ID: the query images
    schedule: Schedule
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    gallery_loader: DataLoader | None = None  # Re-ID: the gallery images


def build_optimizer(train: TrainConfig, groups: list[dict], lr: float) -> torch.optim.Optimizer:
    """AdamW (FGVC, the paper) or SGD with momentum (the paper's Re-ID recipe)."""
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=train.momentum)
    return torch.optim.AdamW(groups, lr=lr)


def build_training(
    cfg: Config, dist: DistInfo, resume_from: tuple[dict[str, Any], Path] | None = None
) -> TrainingParts:
    """Data, model, loss, loaders, LR schedule, optimizer and scaler; logs what the run will do.

    Args:
        resume_from: a checkpoint state and its path: the model and loss weights are loaded
            from it before DDP wraps them (DDP broadcasts rank 0's weights at construction).
            Without one, ``model.init_from`` names a checkpoint whose model weights start the run
            (``finetune``); with one, the resumed checkpoint's weights do.
    """
    t = cfg.train
    device = process_device(resolve_device(t.device), dist)
    amp_dtype = resolve_precision(t.precision, device)
    seed_everything(t.seed)
    with main_process_first(dist):  # rank 0 generates the demo set before the others read it
        data = build_datasets(cfg)
    init_from, arch = (cfg.model.init_from if resume_from is None else None), cfg
    if init_from is not None:  # every weight comes from that checkpoint: no pretrained download
        arch = replace(cfg, model=replace(cfg.model, pretrained=False, pretrained_path=None))
    model = build_model(arch, len(data.classes)).to(device)
    criterion = build_loss(cfg).to(device)
    if resume_from is not None:
        load_weights(resume_from[0], resume_from[1], model, criterion, data.classes)
    elif init_from is not None:
        # Every process loads it (all fail alike on a misfit); one that cannot read the file would
        # leave the others waiting in DDP, so that is checked on all of them first.
        unreadable = [rank for rank, ok in enumerate(gather_from_all(Path(init_from).is_file())) if not ok]
        if unreadable:
            raise CheckpointError(
                f"model.init_from: no checkpoint at {init_from} for process(es) {unreadable}"
            )
        _logger.info("%s", init_from_checkpoint(model, init_from, data.classes, cfg.to_dict()).summary())
    maybe_empty_cache(device)
    train_loader, eval_loader = build_loaders(cfg, data, device, t.seed, dist)
    schedule, described = build_schedule(t, len(train_loader), dist.world_size)
    _logger.info(
        "device %s, precision %s; %d train / %d %s images, %d classes; %s", device,
        str(amp_dtype).removeprefix("torch."), len(data.train), len(data.eval), data.eval_split,
        len(data.classes), described,
    )  # fmt: skip
    groups = parameter_groups({"model": model, "loss": criterion}, t.weight_decay)
    step_module: torch.nn.Module = ModelWithLoss(model, criterion)
    if dist.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        step_module = DistributedDataParallel(step_module, device_ids=device_ids)
    return TrainingParts(
        device=device,
        amp_dtype=amp_dtype,
        data=data,
        model=model,
        criterion=criterion,
        step_module=step_module,
        train_loader=train_loader,
        eval_loader=eval_loader,
        gallery_loader=None if data.gallery is None else build_eval_loader(cfg, data.gallery, device, dist),
        schedule=schedule,
        optimizer=build_optimizer(t, groups, schedule.peak_lr),
        scaler=grad_scaler(device, amp_dtype),
    )


def load_weights(
    state: dict[str, Any], path: Path, model: DualViT, criterion: DCALLoss, classes: list[str]
) -> None:
    """Model and loss weights of a training checkpoint, for a run on the same classes."""
    if list(state["classes"]) != classes:
        raise UsageError(f"cannot resume {path}: the dataset's classes differ from the checkpoint's")
    model.load_state_dict(state["model"])
    criterion.load_state_dict(state["loss"])
