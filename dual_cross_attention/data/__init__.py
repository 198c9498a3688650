"""Datasets (CUB, Stanford Cars, FGVC-Aircraft, folder-per-class, the demo set) and transforms."""

from .base import BottomCrop, ImageDataset
from .datasets import DATASETS, DatasetSplits, build_dataset, build_splits, default_train_split
from .errors import CorruptImageError, DataError, DatasetLayoutError
from .image_io import load_rgb
from .splits import stratified_split
from .synthetic import DemoSpec, generate_demo_dataset
from .transforms import (
    ImagePipeline,
    build_eval_transform,
    build_train_transform,
    build_transforms,
    mean_std_from_model,
)

__all__ = [
    "DATASETS",
    "BottomCrop",
    "CorruptImageError",
    "DataError",
    "DatasetLayoutError",
    "DatasetSplits",
    "DemoSpec",
    "ImageDataset",
    "ImagePipeline",
    "build_dataset",
    "build_eval_transform",
    "build_splits",
    "build_train_transform",
    "build_transforms",
    "default_train_split",
    "generate_demo_dataset",
    "load_rgb",
    "mean_std_from_model",
    "stratified_split",
]
