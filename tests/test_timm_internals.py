"""The timm internals DCAL drives directly, one behaviour per test, so that a timm upgrade that
changes one of them fails here under the attribute's name rather than as a wrong number
elsewhere. Tiny models, no weights."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import Attention, resample_abs_pos_embed
from timm.models import get_arch_name, is_model_in_modules, load_state_dict
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch import nn

from dual_cross_attention.models.backbone import VIT_MODULES, embed
from dual_cross_attention.models.blocks import (
    block_tail,
    explicit_attention,
    fused_attention,
    project_qkv,
    sa_block,
    softmax_scale,
)

PLAIN = "deit_tiny_patch16_224"
DISTILLED = "deit_tiny_distilled_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 5}


def tiny(name: str = PLAIN, **kwargs) -> VisionTransformer:
    return timm.create_model(name, pretrained=False, **{**TINY, **kwargs})


def tokens(model: VisionTransformer, batch: int = 2) -> torch.Tensor:
    """Random tokens (B, N, C) of the model's sequence length."""
    n = model.patch_embed.num_patches + model.num_prefix_tokens
    return torch.randn(batch, n, model.embed_dim)


def seeded(fn, seed: int = 3) -> torch.Tensor:
    torch.manual_seed(seed)
    return fn()


# Block


def test_block_submodules_are_named_as_we_drive_them():
    names = [name for name, _ in tiny().blocks[0].named_children()]
    assert names == ["norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2"]


def test_block_forward_is_pre_norm_attention_then_mlp_with_layer_scale_and_drop_path():
    """x + dp1(ls1(attn(norm1 x))), then x + dp2(ls2(mlp(norm2 x))): the order ``block_tail`` uses."""
    block = tiny(init_values=0.5, drop_path_rate=0.5).blocks[-1].train()
    for name in ("ls1", "ls2", "drop_path1", "drop_path2"):
        assert not isinstance(getattr(block, name), nn.Identity), name
    x = torch.randn(4, 17, 48)

    def by_hand():
        y = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
        return y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))

    torch.testing.assert_close(seeded(lambda: block(x)), seeded(by_hand), rtol=0, atol=0)


def test_layer_scale_and_drop_path_are_identity_by_default():
    block = tiny().blocks[0]
    for name in ("ls1", "ls2", "drop_path1", "drop_path2"):
        assert isinstance(getattr(block, name), nn.Identity), name


# Attention


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("fused", [True, False])
def test_attn_qkv_rows_are_q_k_v_by_head(qkv_bias, fused):
    """Our q/k/v from ``attn.qkv`` and fused attention reproduce timm's Attention.forward."""
    attn = tiny(qkv_bias=qkv_bias).blocks[0].attn.eval()
    attn.fused_attn = fused
    x = torch.randn(2, 17, 48)
    q, k, v = project_qkv(attn, x)
    ours = attn.proj(attn.norm(fused_attention(attn, q, k, v)))
    torch.testing.assert_close(ours, attn(x), atol=1e-6, rtol=1e-5)


def test_attn_head_geometry():
    attn = tiny().blocks[0].attn
    assert (attn.num_heads, attn.head_dim) == (3, 16)
    assert attn.qkv.weight.shape == (3 * attn.num_heads * attn.head_dim, 48)


def test_attn_scale_is_one_over_sqrt_head_dim():
    attn = tiny().blocks[0].attn
    assert attn.scale == attn.head_dim**-0.5 == softmax_scale(attn.head_dim)


def test_q_norm_k_norm_are_identity_by_default_and_per_head_when_enabled():
    attn = tiny().blocks[0].attn
    assert isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
    normed = tiny(qk_norm=True).blocks[0].attn
    assert normed.q_norm.normalized_shape == normed.k_norm.normalized_shape == (normed.head_dim,)


@pytest.mark.parametrize("scale_attn_norm", [False, True])
def test_attn_norm_is_the_scale_norm_before_proj(scale_attn_norm):
    block = tiny(scale_attn_norm=scale_attn_norm).blocks[0].eval()
    if scale_attn_norm:
        assert block.attn.norm.normalized_shape == (block.attn.num_heads * block.attn.head_dim,)
        nn.init.normal_(block.attn.norm.weight)  # so that a misplaced norm shows
    else:
        assert isinstance(block.attn.norm, nn.Identity)
    x = torch.randn(2, 17, 48)
    torch.testing.assert_close(sa_block(block, x)[0], block(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_attn_drop_and_proj_drop_placement(fused):
    """attn_drop on the softmax weights (its p as SDPA's dropout_p), proj_drop after proj."""
    block = tiny(attn_drop_rate=0.5, proj_drop_rate=0.5).blocks[0].train()
    attn = block.attn
    assert attn.attn_drop.p == 0.5 and attn.proj_drop.p == 0.5
    attn.fused_attn = fused
    x = torch.randn(2, 17, 48)
    attend = fused_attention if fused else lambda a, q, k, v: explicit_attention(a, q, k, v)[0]
    ours = seeded(lambda: block_tail(block, x, attend(attn, *project_qkv(attn, block.norm1(x)))))
    torch.testing.assert_close(ours, seeded(lambda: block(x)), atol=1e-6, rtol=1e-5)


def test_attn_gate_is_none_unless_gated():
    """check_supported refuses gated attention by reading ``attn.gate``."""
    assert tiny().blocks[0].attn.gate is None
    assert isinstance(Attention(48, num_heads=3, gated=True).gate, nn.Linear)


@pytest.mark.parametrize("name", [PLAIN, "vit_small_patch16_224", DISTILLED])
def test_vit_blocks_are_the_standard_block_and_attention(name):
    model = timm.create_model(name, pretrained=False, depth=1, img_size=32)
    assert type(model.blocks[0]) is Block and type(model.blocks[0].attn) is Attention


# VisionTransformer


@pytest.mark.parametrize(
    ("name", "kwargs", "prefix"), [(PLAIN, {}, 1), (DISTILLED, {}, 2), (PLAIN, {"reg_tokens": 2}, 3)]
)
def test_num_prefix_tokens(name, kwargs, prefix):
    assert tiny(name, **kwargs).num_prefix_tokens == prefix


def test_patch_embed_grid_is_row_major():
    """``num_patches``/``grid_size`` and token r * W + c is the patch at row r, column c."""
    model = tiny(img_size=(32, 48)).eval()
    assert model.patch_embed.grid_size == (4, 6) and model.patch_embed.num_patches == 24
    image = torch.zeros(1, 3, 32, 48)
    image[..., 8:16, 16:24] = 1.0  # row 1, column 2
    out = model.patch_embed(image)  # (1, 24, C)
    changed = (out - model.patch_embed.proj.bias).abs().sum(-1)[0].nonzero().flatten().tolist()
    assert out.shape == (1, 24, 48) and changed == [1 * 6 + 2]


@pytest.mark.parametrize("name", [PLAIN, DISTILLED])
def test_pos_embed_puts_prefix_tokens_first_and_adds_position(name):
    model = tiny(name).eval()
    patches = torch.randn(2, 16, 48)
    prefix = [model.cls_token] + ([model.dist_token] if name == DISTILLED else [])
    expected = torch.cat([t.expand(2, -1, -1) for t in prefix] + [patches], dim=1) + model.pos_embed
    torch.testing.assert_close(model._pos_embed(patches), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", [PLAIN, DISTILLED])
def test_forward_features_is_embed_blocks_norm(name):
    """forward_features = norm(blocks(x)) with x the tokens ``embed`` builds (patch_embed,
    _pos_embed, patch_drop, norm_pre)."""
    model = tiny(name).eval()
    images = torch.randn(2, 3, 32, 32)
    expected = model.norm(model.blocks(embed(model, images)))
    torch.testing.assert_close(model.forward_features(images), expected, rtol=0, atol=0)


def test_class_token_pooling_attributes():
    """What check_supported reads: a class token pooled by 'token', no attention pool, no patch dropout."""
    model = tiny()
    assert model.cls_token is not None and model.global_pool == "token" and model.attn_pool is None
    assert isinstance(model.patch_drop, nn.Identity) and isinstance(model.fc_norm, nn.Identity)
    assert tiny(global_pool="avg").global_pool == "avg"
    assert not isinstance(tiny(patch_drop_rate=0.5).patch_drop, nn.Identity)


def test_forward_head_pre_logits_is_class_token_after_fc_norm_and_head_drop():
    model = tiny(drop_rate=0.5).train()
    x = tokens(model)
    features = seeded(lambda: model.forward_head(x, pre_logits=True))
    torch.testing.assert_close(
        features, seeded(lambda: model.head_drop(model.fc_norm(x[:, 0]))), rtol=0, atol=0
    )
    torch.testing.assert_close(seeded(lambda: model.forward_head(x)), model.head(features), rtol=0, atol=0)


def test_distilled_forward_head_drops_each_token_and_averages():
    """Class token dropped first, then the distillation token; logits average head and head_dist."""
    model = tiny(DISTILLED, drop_rate=0.5).train()
    assert isinstance(model, VisionTransformerDistilled) and model.distilled_training is False
    x = tokens(model)

    def dropped():
        return model.head_drop(x[:, 0]), model.head_drop(x[:, 1])

    cls, dist = seeded(dropped)
    torch.testing.assert_close(seeded(lambda: model.forward_head(x, pre_logits=True)), (cls + dist) / 2)
    logits = (model.head(cls) + model.head_dist(dist)) / 2
    torch.testing.assert_close(seeded(lambda: model.forward_head(x)), logits, rtol=0, atol=0)


# Model registry and weight loading


@pytest.mark.parametrize(
    ("name", "is_vit"),
    [
        (PLAIN, True),
        (DISTILLED, True),
        ("vit_base_patch16_224.augreg_in21k", True),
        ("vit_base_r50_s16_224", True),
        ("resnet18", False),
    ],
)
def test_vit_families_live_in_the_modules_we_accept(name, is_vit):
    assert timm.is_model(name)
    assert is_model_in_modules(get_arch_name(name), VIT_MODULES) == is_vit


def test_get_arch_name_drops_the_pretrained_tag():
    assert get_arch_name("vit_base_patch16_224.augreg_in21k") == "vit_base_patch16_224"


def test_checkpoint_filter_fn_unwraps_and_resizes_pos_embed():
    source, target = tiny(), tiny(img_size=64)
    state = source.state_dict()
    filtered = checkpoint_filter_fn({"model": state}, target)
    resized = resample_abs_pos_embed(state["pos_embed"], (8, 8), num_prefix_tokens=1)
    torch.testing.assert_close(filtered["pos_embed"], resized)
    assert filtered.keys() == state.keys()
    torch.testing.assert_close(filtered["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("suffix", ["safetensors", "pth"])
def test_load_state_dict_reads_local_files(suffix, tmp_path):
    state = tiny().state_dict()
    path = tmp_path / f"weights.{suffix}"
    if suffix == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded = load_state_dict(str(path), use_ema=False)
    assert loaded.keys() == state.keys()
    torch.testing.assert_close(loaded["pos_embed"], state["pos_embed"])
