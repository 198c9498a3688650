"""DualViT behaviour against independent references: timm's own forward, a naive rollout,
hand-written invariants of PWCA and GLCA."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY, TINY_KWARGS

from dual_cross_attention.diagnostics.cost import count_flops
from dual_cross_attention.models import DualViT, random_derangement


def tiny_model(**overrides) -> DualViT:
    kwargs = dict(TINY, num_classes=5, drop_path_rate=0.0, backbone_kwargs=dict(TINY_KWARGS))
    kwargs.update(overrides)
    return DualViT(**kwargs)


def timm_twin(model: DualViT, name: str) -> torch.nn.Module:
    """A plain timm model with the same weights as ``model.backbone``."""
    twin = timm.create_model(
        name, pretrained=False, num_classes=model.num_classes, img_size=32, **TINY_KWARGS
    )
    twin.load_state_dict(model.backbone.state_dict())
    return twin


def naive_rollout(timm_model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Rollout from timm's explicit-softmax attention (captured at attn_drop) and full N x N products."""
    maps = []
    hooks = []
    for block in timm_model.blocks:
        block.attn.fused_attn = False
        hooks.append(block.attn.attn_drop.register_forward_hook(lambda m, inp, out: maps.append(inp[0])))
    with torch.no_grad():
        timm_model(images)
    for hook in hooks:
        hook.remove()
    n = maps[0].shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    product = eye.expand(images.shape[0], n, n)
    for attention in maps:  # S_1 first: Ŝ = S̄_L ... S̄_1
        product = (0.5 * attention.double().mean(dim=1) + 0.5 * eye) @ product
    return product[:, 0, timm_model.num_prefix_tokens :]


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_without_branches_it_is_the_timm_model(name, images):
    model = tiny_model(backbone=name, glca=False, pwca=False)
    twin = timm_twin(model, name)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in twin.parameters())
    model.train(), twin.train()
    torch.testing.assert_close(model(images).sa_logits, twin(images), atol=1e-5, rtol=1e-5)
    model.eval(), twin.eval()
    with torch.no_grad():
        out = model(images)
        torch.testing.assert_close(out.sa_logits, twin(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.sa_features, twin.forward_head(twin.forward_features(images), True))
    assert out.glca_logits is None and out.pwca_logits is None and out.rollout is None


def test_identity_pairs_make_pwca_equal_sa(images):
    """Softmax over [K1; K1] gives K1's weights, so PWCA with itself as distractor is SA."""
    model = tiny_model().train()
    identity = torch.arange(4)
    out = model(images, pair_index=identity)
    torch.testing.assert_close(out.pwca_logits, out.sa_logits, atol=1e-5, rtol=1e-5)
    other = model(images, pair_index=torch.tensor([1, 0, 3, 2]))
    torch.testing.assert_close(other.sa_logits, out.sa_logits)
    assert (other.pwca_logits - other.sa_logits).abs().max() > 1e-3  # the distractor does change PWCA


def test_pwca_attends_over_both_images_in_one_softmax(images):
    """A one-block model's PWCA logits equal a hand-written attention over [K1; K2]."""
    model = tiny_model(glca=False, backbone_kwargs=dict(TINY_KWARGS, depth=1)).train()
    pairs = torch.tensor([1, 0, 3, 2])
    bb, block = model.backbone, model.backbone.blocks[0]
    tokens = bb._pos_embed(bb.patch_embed(images))
    B, N, C = tokens.shape
    nh, hd = block.attn.num_heads, C // block.attn.num_heads
    q, k, v = block.attn.qkv(block.norm1(tokens)).reshape(B, N, 3, nh, hd).permute(2, 0, 3, 1, 4)
    expected = []
    for i, j in enumerate(pairs.tolist()):
        keys, values = torch.cat([k[i], k[j]], dim=1), torch.cat([v[i], v[j]], dim=1)  # (nh, 2N, hd)
        weights = (q[i] @ keys.transpose(-1, -2) / math.sqrt(hd)).softmax(-1)  # (nh, N, 2N)
        x = tokens[i] + block.attn.proj((weights @ values).transpose(0, 1).reshape(N, C))
        x = x + block.mlp(block.norm2(x))
        expected.append(bb.head(bb.norm(x)[0]))
    out = model(images, pair_index=pairs)
    torch.testing.assert_close(out.pwca_logits, torch.stack(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["train_grad", "train_checkpointed", "eval_no_grad"])
def test_rollout_matches_naive_full_product(mode, images):
    model = tiny_model(grad_checkpointing=mode == "train_checkpointed", pwca=False)
    reference = naive_rollout(timm_twin(model, "deit_tiny_patch16_224").eval(), images)
    if mode == "eval_no_grad":
        with torch.no_grad():
            out = model.eval()(images)
    else:
        out = model.train()(images)
    assert out.rollout.shape == (4, 16)
    torch.testing.assert_close(out.rollout.double(), reference, atol=1e-6, rtol=1e-5)


def test_local_index_is_top_k_of_rollout(images):
    model = tiny_model(top_ratio=0.2).eval()
    with torch.no_grad():
        out = model(images)
    k = math.ceil(0.2 * 16)
    assert out.local_index.shape == (4, k)
    for row, picked in zip(out.rollout.tolist(), out.local_index.tolist(), strict=True):
        by_score = sorted(range(16), key=lambda i: -row[i])
        assert picked == by_score[:k]


def test_at_least_one_local_token():
    assert tiny_model(top_ratio=0.001).num_local_tokens == 1


@pytest.mark.parametrize("training", [True, False])
def test_full_ratio_glca_is_the_last_block_at_init(training, images):
    """GLCA starts as a copy of block L; with every patch selected it is block L (in another order)."""
    model = tiny_model(top_ratio=1.0).train(training)
    with torch.set_grad_enabled(training):
        out = model(images)
    torch.testing.assert_close(out.glca_features, out.sa_features, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.glca_logits, out.sa_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpointed", [False, True])
def test_every_parameter_gets_a_gradient(checkpointed, images):
    model = tiny_model(grad_checkpointing=checkpointed, drop_path_rate=0.1).train()
    out = model(images)
    labels = torch.tensor([0, 1, 2, 3])
    loss = sum(F.cross_entropy(t, labels) for t in (out.sa_logits, out.glca_logits, out.pwca_logits))
    loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert missing == []


def test_checkpointing_gives_the_same_gradients(images):
    torch.manual_seed(1)
    plain = tiny_model()
    checkpointed = tiny_model(grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    labels = torch.tensor([0, 1, 2, 3])
    pairs = torch.tensor([2, 3, 0, 1])
    for model in (plain, checkpointed):
        out = model.train()(images, pair_index=pairs)
        sum(F.cross_entropy(t, labels) for t in (out.sa_logits, out.glca_logits, out.pwca_logits)).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_eval_does_no_pwca_work(images):
    with_pwca = tiny_model(pwca=True).eval()
    without = tiny_model(pwca=False).eval()
    without.load_state_dict(with_pwca.state_dict())
    with torch.no_grad():
        assert with_pwca(images).pwca_logits is None
        assert count_flops(lambda: with_pwca(images)) == count_flops(lambda: without(images))


def test_pwca_needs_two_images():
    model = tiny_model().train()
    with pytest.raises(ValueError, match="at least 2 images.*model.pwca: false"):
        model(torch.randn(1, 3, 32, 32))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).sa_logits.shape == (1, 5)


@pytest.mark.parametrize(
    "pairs", [torch.tensor([1, 0, 3]), torch.tensor([1, 0, 3, 4]), torch.tensor([1.0, 0.0, 3.0, 2.0])]
)
def test_bad_pair_index_is_refused(pairs, images):
    with pytest.raises(ValueError, match="pair_index"):
        tiny_model().train()(images, pair_index=pairs)


def test_random_derangement_is_a_uniform_derangement():
    seen = {}
    for _ in range(400):
        perm = random_derangement(4).tolist()
        assert sorted(perm) == [0, 1, 2, 3]
        assert all(p != i for i, p in enumerate(perm))
        seen[tuple(perm)] = seen.get(tuple(perm), 0) + 1
    assert len(seen) == 9  # the 9 derangements of 4 items all occur
    assert min(seen.values()) > 20  # about 44 each


def test_predict_sums_the_softmax_outputs(images):
    model = tiny_model().train()
    probs = model.predict(images)
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        out = model(images)
    expected = out.sa_logits.softmax(-1) + out.glca_logits.softmax(-1)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(model.predict(images, mode="sa"), out.sa_logits.softmax(-1))
    torch.testing.assert_close(model.predict(images, mode="glca"), out.glca_logits.softmax(-1))
    with pytest.raises(ValueError, match="mode must be one of"):
        model.predict(images, mode="pwca")
    with pytest.raises(ValueError, match="glca=False"):
        tiny_model(glca=False).predict(images, mode="sa+glca")


def test_top_ratio_is_checked():
    with pytest.raises(ValueError, match="top_ratio"):
        tiny_model(top_ratio=0.0)
