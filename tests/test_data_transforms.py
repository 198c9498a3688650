"""Albumentations pipelines: sizes, normalization, flip, reseeding per DataLoader worker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dual_cross_attention.data import (
    build_eval_transform,
    build_train_transform,
    build_transforms,
    mean_std_from_model,
)

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.1)


def _image(height=30, width=40):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def _normalized(image):
    return torch.from_numpy(((image / 255.0 - MEAN) / STD).transpose(2, 0, 1)).float()


def test_output_shapes_and_dtype():
    train, evaluation = build_transforms(img_size=24, resize_size=28, mean=MEAN, std=STD)
    for pipeline in (train, evaluation):
        out = pipeline(_image())
        assert out.shape == (3, 24, 24) and out.dtype == torch.float32


def test_eval_without_resize_is_exact_normalization():
    image = _image(24, 24)
    out = build_eval_transform(24, 24, MEAN, STD)(image)
    torch.testing.assert_close(out, _normalized(image), atol=1e-5, rtol=0)


def test_eval_center_crop_takes_the_middle():
    image = _image(32, 32)
    out = build_eval_transform(img_size=16, resize_size=32, mean=MEAN, std=STD)(image)
    torch.testing.assert_close(out, _normalized(image[8:24, 8:24]), atol=1e-5, rtol=0)


def test_train_without_crop_is_image_or_its_mirror_and_flips_sometimes():
    image = _image(16, 16)
    pipeline = build_train_transform(16, 16, MEAN, STD, seed=0)
    plain, mirror = _normalized(image), _normalized(image[:, ::-1])
    flips = []
    for _ in range(20):
        out = pipeline(image)
        is_plain = torch.allclose(out, plain, atol=1e-5)
        assert is_plain or torch.allclose(out, mirror, atol=1e-5)
        flips.append(not is_plain)
    assert 0 < sum(flips) < 20
    never = build_train_transform(16, 16, MEAN, STD, hflip=False)
    assert all(torch.allclose(never(image), plain, atol=1e-5) for _ in range(5))


def test_train_seed_is_reproducible():
    image = _image()
    a = build_train_transform(16, 24, MEAN, STD, seed=3)
    b = build_train_transform(16, 24, MEAN, STD, seed=3)
    for _ in range(5):
        torch.testing.assert_close(a(image), b(image))


class _Repeated(Dataset):
    """The same asymmetric image n times, so only the augmentation differs between items."""

    def __init__(self, n, transform):
        self.n, self.transform, self.image = n, transform, _image(8, 8)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        return self.transform(self.image)


def test_workers_do_not_replay_the_same_augmentations():
    torch.manual_seed(0)
    pipeline = build_train_transform(8, 8, MEAN, STD)
    loader = DataLoader(_Repeated(32, pipeline), batch_size=1, num_workers=2)
    flipped = [not torch.allclose(x[0], _normalized(_image(8, 8)), atol=1e-5) for x in loader]
    # batches alternate between the two workers; forked copies of one random state would give
    # identical flip sequences
    assert flipped[0::2] != flipped[1::2]


def test_bad_arguments():
    with pytest.raises(ValueError, match="img_size <= resize_size"):
        build_train_transform(32, 16, MEAN, STD)
    with pytest.raises(ValueError, match="std > 0"):
        build_eval_transform(16, 16, MEAN, (0.2, 0.0, 0.1))
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        build_eval_transform(8, 8, MEAN, STD)(np.zeros((8, 8), dtype=np.uint8))


def test_mean_std_from_model():
    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=32, depth=1)
    assert mean_std_from_model(model) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = model

    assert mean_std_from_model(Wrapper())[0] == (0.485, 0.456, 0.406)
    with pytest.raises(ValueError, match="pass mean and std explicitly"):
        mean_std_from_model(torch.nn.Linear(2, 2))
