"""Rollout without N x N maps (issue 16): fused attention keeps each query's log-sum-exp and the
rollout is summed tile by tile. References are independent: timm's own explicit-softmax
attention (captured where it applies attn_drop) multiplied out as full matrices, torch's
logsumexp, and ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from dual_cross_attention.diagnostics.cost import count_flops
from dual_cross_attention.models import DualViT, blocks, dual_vit, fused_lse
from dual_cross_attention.models.fused_lse import attention_with_lse, lse_kernels
from dual_cross_attention.models.rollout import row_times_attention

PLAIN, DISTILLED = "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"
SMALL = {  # N = 65 or 197 tokens (plus one for the distilled model), head_dim 24
    64: dict(patch_size=8, embed_dim=96, depth=3, num_heads=4),
    224: dict(embed_dim=96, depth=2, num_heads=4),
}


@pytest.fixture(autouse=True)
def _fresh_capability_cache():
    """Each test sees the capability check run (and log) anew, and leaves no patched result behind."""
    lse_kernels.cache_clear()
    yield
    lse_kernels.cache_clear()


def small_model(name: str = PLAIN, px: int = 64, **kwargs) -> DualViT:
    kwargs = dict(pwca=False, drop_path_rate=0.0, top_ratio=0.25, **kwargs)
    return DualViT(name, num_classes=5, img_size=px, pretrained=False, backbone_kwargs=SMALL[px], **kwargs)


def make_unavailable(monkeypatch) -> None:
    """As on a torch without the CPU kernel: the op name is not in torch.ops.aten."""
    monkeypatch.setitem(fused_lse.KERNEL_NAMES, ("cpu", fused_lse.FLASH), "_no_such_attention_kernel")
    lse_kernels.cache_clear()


def explicit_path(model: DualViT, images: torch.Tensor, monkeypatch) -> object:
    """``model(images)`` with the lse kernel made unavailable; the patch is undone afterwards."""
    with monkeypatch.context() as patch:
        make_unavailable(patch)
        out = model(images)
    lse_kernels.cache_clear()
    return out


def timm_maps(model: DualViT, images: torch.Tensor, training: bool = False) -> list[torch.Tensor]:
    """Softmax maps (B, nh, N, N) of every block from timm's own explicit attention (fused_attn off),
    captured at the input of attn_drop (before any dropout), on a copy of the backbone."""
    timm_model = copy.deepcopy(model.backbone).train(training)
    maps = []
    for block in timm_model.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda m, inp, out: maps.append(inp[0].detach()))
    with torch.no_grad():
        timm_model(images)
    return maps


def naive_rollout(maps: list[torch.Tensor], num_prefix: int) -> torch.Tensor:
    """Class row over the patches of (0.5 S_L + 0.5 I) ... (0.5 S_1 + 0.5 I), full products in float64."""
    n = maps[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    product = eye.expand(maps[0].shape[0], n, n)
    for attention in maps:  # S_1 first
        product = (0.5 * attention.double().mean(dim=1) + 0.5 * eye) @ product
    return product[:, 0, num_prefix:]


# The rollout against timm's maps


@pytest.mark.parametrize("name", [PLAIN, DISTILLED])
@pytest.mark.parametrize("px", [64, 224])
@pytest.mark.parametrize("mode", ["eval", "train", "train_checkpointed"])
def test_fused_rollout_is_the_full_matrix_rollout_of_timm_maps(name, px, mode):
    model = small_model(name, px, grad_checkpointing=mode == "train_checkpointed")
    images = torch.randn(2, 3, px, px)
    reference = naive_rollout(timm_maps(model, images), model.num_prefix_tokens)
    with torch.set_grad_enabled(mode != "eval"):
        out = model.train(mode != "eval")(images)
    assert out.rollout.dtype == torch.float32
    torch.testing.assert_close(out.rollout.double(), reference, rtol=1e-5, atol=1e-7)


def test_rollout_uses_the_undropped_maps_when_attention_dropout_is_on():
    """attn_drop acts on the weights after the softmax; rollout must see the maps without it."""
    model = DualViT(
        PLAIN, num_classes=5, img_size=64, pretrained=False, pwca=False, drop_path_rate=0.0,
        backbone_kwargs=dict(SMALL[64], attn_drop_rate=0.5),
    )  # fmt: skip
    images = torch.randn(2, 3, 64, 64)
    torch.manual_seed(5)  # the same dropout masks in both: one draw per block, same shapes, same order
    reference = naive_rollout(timm_maps(model, images, training=True), model.num_prefix_tokens)
    torch.manual_seed(5)
    out = model.train()(images)
    torch.testing.assert_close(out.rollout.double(), reference, rtol=1e-5, atol=1e-7)
    without_dropout = naive_rollout(timm_maps(model, images), model.num_prefix_tokens)
    assert not torch.allclose(reference, without_dropout, rtol=1e-3)  # dropout did act upstream


@pytest.mark.parametrize("name", [PLAIN, DISTILLED])
def test_fused_rollout_under_bf16_autocast_is_within_bf16_of_the_float32_one(name, monkeypatch):
    """Under autocast q/k come from bf16 projections; the rollout itself still runs in float32."""
    model = small_model(name).eval()
    images = torch.randn(2, 3, 64, 64)
    reference = naive_rollout(timm_maps(model, images), model.num_prefix_tokens)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model(images)
        explicit = explicit_path(model, images, monkeypatch)
    assert fused.rollout.dtype == torch.float32
    torch.testing.assert_close(fused.rollout.double(), reference, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(explicit.rollout.double(), reference, rtol=2e-2, atol=1e-4)


# Fused against explicit


@pytest.mark.parametrize("name", [PLAIN, DISTILLED])
@pytest.mark.parametrize("training", [False, True])
def test_fused_and_explicit_paths_agree(name, training, monkeypatch):
    model = small_model(name, glca_readout="cls+local").train(training)
    images = torch.randn(3, 3, 64, 64)
    with torch.set_grad_enabled(training):
        fused = model(images)
        explicit = explicit_path(model, images, monkeypatch)
    assert torch.equal(fused.local_index, explicit.local_index)
    torch.testing.assert_close(fused.rollout, explicit.rollout, rtol=1e-5, atol=1e-7)
    for key in ("sa_logits", "glca_logits", "sa_features", "glca_features"):
        torch.testing.assert_close(getattr(fused, key), getattr(explicit, key), rtol=1e-5, atol=1e-5)


def test_explicit_path_is_used_and_logged_when_the_kernel_is_missing(monkeypatch, caplog):
    model = small_model().eval()
    images = torch.randn(2, 3, 64, 64)
    calls = []

    def counted(*args):
        calls.append(1)
        return blocks.sa_block_with_map(*args)

    monkeypatch.setattr(dual_vit, "sa_block_with_map", counted)
    make_unavailable(monkeypatch)
    with caplog.at_level(logging.INFO, logger=fused_lse.__name__), torch.no_grad():
        model(images)
        model(images)
    assert len(calls) == 2 * len(model.backbone.blocks)  # every block, both forwards
    messages = [r.getMessage() for r in caplog.records if r.name == fused_lse.__name__]
    assert len(messages) == 1 and "explicit path" in messages[0]
    assert "_no_such_attention_kernel: not in this torch" in messages[0]


def test_explicit_path_when_the_kernel_refuses_the_input(monkeypatch, caplog):
    def refuses(*args):
        raise RuntimeError("scaled_dot_product_attention_flash_attention: not for this input")

    monkeypatch.setattr(fused_lse, "_run_kernel", refuses)
    with caplog.at_level(logging.INFO, logger=fused_lse.__name__):
        assert not fused_lse.lse_available(torch.zeros(1, 5, 96), 24)
    assert "explicit path" in caplog.text and "not for this input" in caplog.text


def test_fused_path_is_logged_once(caplog):
    model = small_model().eval()
    with caplog.at_level(logging.INFO, logger=fused_lse.__name__), torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 3, 64, 64))
    messages = [r.getMessage() for r in caplog.records if r.name == fused_lse.__name__]
    assert len(messages) == 1 and "fused path" in messages[0]


# No N x N tensor


class OutputShapes(TorchDispatchMode):
    """Records the shape of every tensor any aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def square_maps(shapes: list[tuple[int, ...]], n: int) -> list[tuple[int, ...]]:
    return [s for s in shapes if len(s) >= 2 and s[-2:] == (n, n)]


def test_inference_allocates_no_n_by_n_tensor(monkeypatch):
    """With tiles smaller than one map, no op in the inference forward returns an N x N anything
    (per head, per image or head-averaged); the explicit path, as a control, does."""
    monkeypatch.setitem(fused_lse.TILE_ELEMENTS, "cpu", 2**11)  # < N x N = 65 x 65
    model = small_model(glca_select="last").eval()
    images = torch.randn(2, 3, 64, 64)
    n = model.num_patches + model.num_prefix_tokens
    model(images[:1])  # the capability check runs outside the recording
    with torch.no_grad(), OutputShapes() as fused:
        model(images)
    assert fused.shapes and square_maps(fused.shapes, n) == []
    with torch.no_grad(), OutputShapes() as explicit:
        explicit_path(model, images, monkeypatch)
    assert (2, 4, n, n) in square_maps(explicit.shapes, n)


def test_rollout_tiles_stay_within_their_budget(monkeypatch):
    """Tiles of whole maps hold at most TILE_ELEMENTS scores: here 3 of the 2 x 4 maps of a block."""
    model = small_model().eval()
    images = torch.randn(2, 3, 64, 64)
    n = model.num_patches + model.num_prefix_tokens
    monkeypatch.setitem(fused_lse.TILE_ELEMENTS, "cpu", 3 * n * n)
    model(images[:1])
    with torch.no_grad(), OutputShapes() as fused:
        model(images)
    assert set(square_maps(fused.shapes, n)) == {(3, n, n), (2, n, n)}  # 3 + 3 + 2 maps per block


def test_rollout_tiles_cover_every_row_and_key(monkeypatch):
    """Tiles that split the rows unevenly (and several maps per tile) give the same product."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 37, 8), torch.randn(2, 3, 37, 8)
    row = torch.rand(2, 37)
    maps = ((q * 8**-0.5) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)  # (2, 37, 37)
    expected = (row.unsqueeze(1) @ maps).squeeze(1)
    lse = torch.logsumexp((q * 8**-0.5) @ k.transpose(-2, -1), dim=-1)
    for tile in (37 * 5, 37 * 37 * 4, 10**6):  # 5 rows; 4 whole maps; everything
        monkeypatch.setitem(fused_lse.TILE_ELEMENTS, "cpu", tile)
        for shift in (None, lse, lse.bfloat16().float() + 1e-3):  # max; exact lse; an approximate one
            bf16 = shift is not None and shift is not lse
            qq, kk = (q.bfloat16(), k.bfloat16()) if bf16 else (q, k)
            ref = expected if not bf16 else row_reference(row, qq.float(), kk.float())
            torch.testing.assert_close(row_times_attention(row, qq, kk, shift), ref, rtol=1e-5, atol=1e-7)


def row_reference(row: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    maps = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)
    return (row.unsqueeze(1) @ maps).squeeze(1)


# attention_with_lse against SDPA and torch.logsumexp


def qkv(batch=2, heads=3, n=50, hd=16, dtype=torch.float32, grad=False):
    torch.manual_seed(1)
    return [torch.randn(batch, heads, n, hd, dtype=dtype, requires_grad=grad) for _ in range(3)]


def reference_lse(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp((q.double() @ k.double().transpose(-2, -1)) * q.shape[-1] ** -0.5, dim=-1)


@pytest.mark.parametrize("backend", ["default", "math"])
def test_attention_with_lse_is_sdpa_and_its_gradient(backend):
    scale = 16**-0.5
    q, k, v = qkv(grad=True)
    backends = [SDPBackend.MATH] if backend == "math" else [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends):
        out, lse = attention_with_lse(q, k, v, scale)
        expected = F.scaled_dot_product_attention(q, k, v, scale=scale)
    assert lse.shape == (2, 3, 50) and lse.dtype == torch.float32 and not lse.requires_grad
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), reference_lse(q, k), rtol=1e-6, atol=1e-6)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_attention_with_lse_counts_the_flops_of_math_sdpa():
    """FLOPs are counted under the math backend: the lse read off the scores costs no matmul."""
    q, k, v = qkv()
    ours = count_flops(lambda: attention_with_lse(q, k, v, 0.25))
    assert ours == count_flops(lambda: F.scaled_dot_product_attention(q, k, v, scale=0.25)) > 0


def test_attention_with_lse_under_dropout_gives_the_lse_of_the_undropped_scores():
    q, k, v = qkv()
    out, lse = attention_with_lse(q, k, v, 16**-0.5, dropout_p=0.5)
    torch.testing.assert_close(lse.double(), reference_lse(q, k), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v, scale=16**-0.5))


def test_attention_with_lse_bf16():
    q, k, v = qkv(dtype=torch.bfloat16)
    out, lse = attention_with_lse(q, k, v, 16**-0.5)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=16**-0.5))
    torch.testing.assert_close(lse.double(), reference_lse(q, k), rtol=1e-3, atol=1e-3)


def test_fused_backend_without_an_lse_kernel_gets_its_lse_in_tiles(monkeypatch):
    """Where SDPA picks a fused kernel that has no lse op here (cuDNN, say), the output is SDPA's
    and lse is computed row tile by row tile."""
    monkeypatch.setattr(fused_lse, "lse_kernels", lambda device, dtype, head_dim: frozenset())
    monkeypatch.setitem(fused_lse.TILE_ELEMENTS, "cpu", 2 * 3 * 50 * 7)  # 7 rows per tile
    q, k, v = qkv()
    out, lse = attention_with_lse(q, k, v, 16**-0.5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=16**-0.5))
    torch.testing.assert_close(lse.double(), reference_lse(q, k), rtol=1e-6, atol=1e-6)


def test_inference_flops_add_one_score_matmul_per_block_below_the_last(monkeypatch):
    """What the fused path trades for the maps: QK^T again for blocks 1..L-1 (2 N^2 hd per head and
    image; the lse shift is the matmul's additive term, which counts nothing), plus the
    row-times-map products; the explicit path reuses its maps."""
    model = small_model().eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = count_flops(lambda: model(images))
        explicit = count_flops(lambda: explicit_path(model, images, monkeypatch))
    n, c, heads, depth = 65, 96, 4, 3
    score_matmuls = (depth - 1) * 2 * 2 * n * n * c  # batch 2
    products = (depth - 1) * 2 * 2 * n * n * (heads - 1)  # per head here, once on the head mean there
    assert fused - explicit == score_matmuls + products + 2 * 2 * n * c  # + the last block's class row
