"""Backbone families and sizes, pretrained-weight loading and the refusals, all offline."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from conftest import TINY, TINY_KWARGS
from safetensors.torch import save_file

from dual_cross_attention.models import DualViT, UnsupportedBackboneError
from dual_cross_attention.models.backbone import head_outputs

FAMILIES = [
    ("deit_tiny_patch16_224", 1),
    ("deit_small_patch16_224", 1),
    ("deit_base_patch16_224", 1),
    ("vit_base_patch16_224.augreg_in21k", 1),
    ("vit_base_r50_s16_224", 1),
    ("deit_tiny_distilled_patch16_224", 2),
    ("deit_small_distilled_patch16_224", 2),
    ("deit_base_distilled_patch16_224", 2),
]


@pytest.mark.parametrize("img_size", [224, 384, 448])
@pytest.mark.parametrize(("name", "prefix_tokens"), FAMILIES)
def test_every_family_runs_at_every_size(name, prefix_tokens, img_size):
    # One block keeps the test fast; embedding, prefix tokens and block type are the family's own.
    model = DualViT(name, num_classes=7, img_size=img_size, pretrained=False, backbone_kwargs={"depth": 1})
    patches = (img_size // 16) ** 2
    assert model.num_prefix_tokens == prefix_tokens
    assert model.num_patches == patches
    out = model.train()(torch.randn(2, 3, img_size, img_size))
    for logits in (out.sa_logits, out.glca_logits, out.pwca_logits):
        assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert out.rollout.shape == (2, patches)
    assert out.local_index.shape == (2, math.ceil(0.1 * patches))


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_head_outputs_are_timms_forward_head_from_one_dropout_draw(name):
    """Logits as timm's forward_head with the same head-dropout draw; features as its pre_logits."""
    model = timm.create_model(
        name, pretrained=False, num_classes=5, img_size=32, drop_rate=0.5, **TINY_KWARGS
    )
    model.train()
    tokens = torch.randn(4, 16 + model.num_prefix_tokens, 48)
    torch.manual_seed(7)
    features, logits = head_outputs(model, tokens)
    torch.manual_seed(7)
    torch.testing.assert_close(logits, model.forward_head(tokens), rtol=0, atol=0)
    torch.manual_seed(7)
    torch.testing.assert_close(features, model.forward_head(tokens, pre_logits=True), rtol=0, atol=0)
    if name == "deit_tiny_patch16_224":
        torch.testing.assert_close(logits, model.head(features), rtol=0, atol=0)
    assert (features == 0).any()  # the dropout was live


def tiny_timm(num_classes: int = 5, img_size: int = 32, **extra) -> torch.nn.Module:
    return timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=False,
        num_classes=num_classes,
        img_size=img_size,
        **TINY_KWARGS,
        **extra,
    )


def load_tiny(path, img_size: int = 64, num_classes: int = 5) -> DualViT:
    kwargs = dict(TINY, img_size=img_size, pretrained=True, pretrained_path=str(path))
    return DualViT(**kwargs, num_classes=num_classes, backbone_kwargs=dict(TINY_KWARGS))


def assert_blocks_equal(model: DualViT, source: torch.nn.Module) -> None:
    for key, value in source.blocks.state_dict().items():
        torch.testing.assert_close(model.backbone.blocks.state_dict()[key], value, msg=key)
    # GLCA is initialised from the loaded last block, not from a random one.
    for key, value in source.blocks[-1].state_dict().items():
        torch.testing.assert_close(model.glca_block.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("fmt", ["safetensors", "pth", "pth_wrapped"])
def test_pretrained_file_loads_with_resized_position_embedding(fmt, tmp_path):
    source = tiny_timm(num_classes=1000)
    state = source.state_dict()
    path = tmp_path / f"weights.{fmt.split('_')[0]}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state} if fmt == "pth_wrapped" else state, path)
    model = load_tiny(path, img_size=64, num_classes=5)
    assert_blocks_equal(model, source)
    assert model.backbone.pos_embed.shape == (1, 1 + 64, 48)  # 4x4 grid resized to 8x8
    resized = timm.layers.resample_abs_pos_embed(state["pos_embed"], (8, 8), num_prefix_tokens=1)
    torch.testing.assert_close(model.backbone.pos_embed.data, resized)
    assert model.backbone.head.weight.shape == (5, 48)  # fresh head for the new label set


def test_pretrained_file_with_foreign_keys_is_refused(tmp_path):
    state = tiny_timm().state_dict()
    state["blocks.0.extra.weight"] = torch.zeros(3)
    del state["blocks.1.mlp.fc1.bias"]
    path = tmp_path / "weights.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.mlp.fc1.bias'\].*blocks.0.extra.weight"):
        load_tiny(path)


def test_pretrained_file_must_exist_and_be_enabled(tmp_path):
    with pytest.raises(FileNotFoundError, match="no file at"):
        load_tiny(tmp_path / "absent.pth")
    with pytest.raises(ValueError, match="model.pretrained is false"):
        DualViT(**dict(TINY, pretrained_path="x.pth"), num_classes=5, backbone_kwargs=dict(TINY_KWARGS))


def to_augreg_npz(model: torch.nn.Module, path) -> None:
    """Write ``model`` in the layout of Google's AugReg .npz files (the inverse of timm's reader)."""
    C = model.embed_dim
    nh = model.blocks[0].attn.num_heads
    w = {
        "embedding/kernel": model.patch_embed.proj.weight.permute(2, 3, 1, 0),
        "embedding/bias": model.patch_embed.proj.bias,
        "cls": model.cls_token,
        "Transformer/posembed_input/pos_embedding": model.pos_embed,
        "Transformer/encoder_norm/scale": model.norm.weight,
        "Transformer/encoder_norm/bias": model.norm.bias,
        "head/kernel": model.head.weight.T,
        "head/bias": model.head.bias,
    }
    for i, block in enumerate(model.blocks):
        p = f"Transformer/encoderblock_{i}/"
        mha = p + "MultiHeadDotProductAttention_1/"
        for j, name in enumerate(("query", "key", "value")):
            rows = slice(j * C, (j + 1) * C)
            w[f"{mha}{name}/kernel"] = block.attn.qkv.weight[rows].T.reshape(C, nh, C // nh)
            w[f"{mha}{name}/bias"] = block.attn.qkv.bias[rows].reshape(nh, C // nh)
        w[f"{mha}out/kernel"] = block.attn.proj.weight.T.reshape(nh, C // nh, C)
        w[f"{mha}out/bias"] = block.attn.proj.bias
        for norm, name in ((block.norm1, "LayerNorm_0"), (block.norm2, "LayerNorm_2")):
            w[f"{p}{name}/scale"], w[f"{p}{name}/bias"] = norm.weight, norm.bias
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[f"{p}MlpBlock_3/Dense_{r}/kernel"], w[f"{p}MlpBlock_3/Dense_{r}/bias"] = fc.weight.T, fc.bias
    np.savez(path, **{k: v.detach().numpy() for k, v in w.items()})


def test_npz_weights_load(tmp_path):
    source = tiny_timm(num_classes=1000)
    path = tmp_path / "augreg.npz"
    to_augreg_npz(source, path)
    model = load_tiny(path, img_size=32)
    assert_blocks_equal(model, source)
    torch.testing.assert_close(model.backbone.pos_embed.data, source.pos_embed.data)


def test_npz_missing_array_is_named(tmp_path):
    source = tiny_timm()
    path = tmp_path / "augreg.npz"
    to_augreg_npz(source, path)
    arrays = dict(np.load(path))
    del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="encoderblock_1/LayerNorm_2/scale"):
        load_tiny(path, img_size=32)


def test_hub_download_without_network_says_what_to_do():
    code = (
        "from dual_cross_attention.models import DualViT\n"
        "DualViT('deit_tiny_patch16_224', num_classes=3, img_size=224, pretrained=True)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "model.pretrained_path" in result.stderr and "model.pretrained: false" in result.stderr


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("resnet18", {}, "is not a timm VisionTransformer"),
        ("deit_tiny_patch16_224", {"global_pool": "avg"}, "does not classify from a class token"),
        ("deit_tiny_patch16_224", {"patch_drop_rate": 0.5}, "patch_drop_rate: 0"),
        (
            "vit_small_patch16_224",
            {"block_fn": timm.models.vision_transformer.ParallelScalingBlock},
            "standard pre-norm timm Block",
        ),
        ("deit_tiny_patch16_244", {}, "Close matches"),
    ],
)
def test_unsupported_backbones_are_refused(name, kwargs, message):
    with pytest.raises((UnsupportedBackboneError, ValueError), match=message):
        DualViT(name, num_classes=3, img_size=224, pretrained=False, backbone_kwargs=kwargs)
