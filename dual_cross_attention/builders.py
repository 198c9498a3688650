"""The one place where the config becomes objects: model, loss, datasets and loaders.

Modules below this take explicit arguments and never see the config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import timm
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .config import Config
from .data import build_splits
from .data.transforms import build_eval_transform, build_train_transform
from .distributed import DistInfo, ShardSampler
from .losses import DCALLoss
from .models import DualViT

_logger = logging.getLogger(__name__)


@dataclass
class DataBundle:
    train: Dataset
    eval: Dataset
    eval_split: str  # "val" when a validation split exists, else "test"
    classes: list[str]


def build_model(cfg: Config, num_classes: int) -> DualViT:
    m = cfg.model
    return DualViT(
        backbone=m.backbone,
        num_classes=num_classes,
        img_size=cfg.data.img_size,
        pretrained=m.pretrained,
        pretrained_path=m.pretrained_path,
        top_ratio=m.top_ratio,
        glca=m.glca,
        pwca=m.pwca,
        drop_path_rate=m.drop_path_rate,
        grad_checkpointing=m.grad_checkpointing,
        backbone_kwargs=dict(m.backbone_kwargs),
    )


def build_loss(cfg: Config) -> DCALLoss:
    branches = ("sa",) + (("glca",) if cfg.model.glca else ()) + (("pwca",) if cfg.model.pwca else ())
    return DCALLoss(
        branches,
        weighting=cfg.loss.weighting,
        init_std=cfg.loss.init_std,
        clamp=cfg.loss.clamp,
        fixed_weights=dict(cfg.loss.weights),
        label_smoothing=cfg.train.label_smoothing,
    )


def normalization(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std the backbone was pretrained with (timm's pretrained_cfg for that name and tag)."""
    pretrained_cfg = timm.models.get_pretrained_cfg(backbone)
    if pretrained_cfg is None:
        raise ValueError(
            f"timm has no pretrained_cfg for '{backbone}', so its input normalization is unknown"
        )
    return tuple(pretrained_cfg.mean), tuple(pretrained_cfg.std)


def build_datasets(cfg: Config) -> DataBundle:
    """Train and model-selection datasets with their transforms (val when there is one, else test)."""
    d = cfg.data
    mean, std = normalization(cfg.model.backbone)
    options = {"level": d.level, "crop_banner": d.crop_banner} if d.dataset == "aircraft" else {}
    splits = build_splits(
        d.dataset,
        d.root,
        build_train_transform(d.img_size, d.resize_size, mean, std),
        build_eval_transform(d.img_size, d.resize_size, mean, std),
        val_fraction=d.val_fraction,
        val_seed=d.val_seed,
        skip_corrupt=d.skip_corrupt,
        **options,
    )
    evaluation, eval_split = (splits.val, "val") if splits.val is not None else (splits.test, "test")
    return DataBundle(
        train=splits.train, eval=evaluation, eval_split=eval_split, classes=list(splits.train.classes)
    )


def build_loaders(
    cfg: Config, data: DataBundle, device: torch.device, seed: int, dist: DistInfo
) -> tuple[DataLoader, DataLoader]:
    """Training loader (shuffled, full batches only: PWCA needs >= 2 images) and eval loader.

    Under torchrun each process gets its share: a DistributedSampler for training (the trainer
    calls ``set_epoch``), and for evaluation a sampler that hands every image to exactly one
    process, without the padding DistributedSampler would add.
    """
    batch = cfg.train.batch_size
    if len(data.train) < batch * dist.world_size:
        raise ValueError(
            f"the training split has {len(data.train)} images, fewer than train.batch_size={batch} x "
            f"{dist.world_size} processes"
        )
    common = dict(num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
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
    eval_sampler = ShardSampler(len(data.eval), dist.rank, dist.world_size)
    eval_batch = cfg.data.eval_batch_size or 2 * batch
    evaluation = DataLoader(data.eval, batch_size=eval_batch, sampler=eval_sampler, **common)
    return train, evaluation


def start_epoch(loader: DataLoader, epoch: int, epoch_seed: int) -> None:
    """Make the epoch's shuffle (and worker seeds) a function of the epoch alone."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    else:
        loader.generator.manual_seed(epoch_seed)
