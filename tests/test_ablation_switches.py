"""The ablation switches of DualViT (glca_readout, glca_select, glca_kv, pwca_blocks) against
independent references: timm's own Block forward, attention written out with an explicit
softmax, timm's explicit attention maps, and the config/checkpoint round trip."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_KWARGS, run
from test_model import timm_twin, tiny_model

from dual_cross_attention.builders import build_model
from dual_cross_attention.checkpoint import load_checkpoint
from dual_cross_attention.config import ConfigError, load_config
from dual_cross_attention.diagnostics.cost import count_flops
from dual_cross_attention.prediction import load_trained
from dual_cross_attention.resume import RESUME_MAY_CHANGE

SWITCHES = {"glca_readout": "local", "glca_select": "random", "glca_kv": "local", "pwca_blocks": 1}
PAIRS = torch.tensor([1, 0, 3, 2])


def hand_block(block: torch.nn.Module, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """A timm Block written out: ``queries`` (B, Nq, C) attend to ``context`` (B, Nk, C) with an
    explicit softmax, then the residual MLP (no layer scale, no dropout)."""
    B, Nq, C = queries.shape
    nh = block.attn.num_heads
    hd = C // nh

    def heads(tokens: torch.Tensor) -> torch.Tensor:  # (B, n, 3C) -> (3, B, nh, n, hd)
        return block.attn.qkv(block.norm1(tokens)).reshape(B, -1, 3, nh, hd).permute(2, 0, 3, 1, 4)

    q = heads(queries)[0]
    _, k, v = heads(context)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1)  # (B, nh, Nq, Nk)
    x = queries + block.attn.proj((weights @ v).transpose(1, 2).reshape(B, Nq, C))
    return x + block.mlp(block.norm2(x))


def gathered(x: torch.Tensor, index: torch.Tensor, prefix: int = 1) -> torch.Tensor:
    """Patch tokens ``index`` (B, k) of ``x`` (B, N, C)."""
    return torch.stack([x[b, prefix + index[b]] for b in range(x.shape[0])])


def glca_input(model, batch: int = 2) -> torch.Tensor:
    """Random tokens standing for block L's input, (B, N, C)."""
    return torch.randn(batch, model.num_prefix_tokens + model.num_patches, model.backbone.embed_dim)


TWO_SELECTIONS = torch.tensor([[0, 3, 5, 9], [1, 2, 14, 15]]), torch.tensor([[4, 6, 7, 8], [0, 10, 11, 12]])


# glca_readout


@torch.no_grad()
def test_local_readout_follows_the_selection_and_is_the_mean_of_the_gathered_rows():
    model = tiny_model(glca_readout="local", pwca=False, top_ratio=0.25).eval()
    x = glca_input(model)
    # Each query row of a timm Block depends only on itself and all keys: the full block's rows.
    normed = model.glca_norm(model.glca_block(x))
    logits = []
    for index in TWO_SELECTIONS:
        features = model._glca(x, index)[0]
        torch.testing.assert_close(features, gathered(normed, index).mean(dim=1), atol=1e-5, rtol=1e-5)
        logits.append(model.glca_head(features))
    assert (logits[0] - logits[1]).abs().max() > 1e-3


@torch.no_grad()
def test_cls_readout_ignores_the_selection_and_runs_only_the_prefix_queries(images):
    cls = tiny_model(pwca=False, top_ratio=0.25).eval()
    assert cls.glca_readout == "cls"
    x = glca_input(cls)
    first, second = (cls._glca(x, index)[0] for index in TWO_SELECTIONS)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, cls.glca_norm(cls.glca_block(x))[:, 0], atol=1e-5, rtol=1e-5)
    local = tiny_model(pwca=False, top_ratio=0.25, glca_readout="local").eval()
    local.load_state_dict(cls.state_dict())
    assert count_flops(lambda: cls(images)) < count_flops(lambda: local(images))


@pytest.mark.parametrize("backbone", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
@torch.no_grad()
def test_cls_plus_local_readout_is_the_mean_of_the_class_and_local_tokens(backbone):
    """A distilled DeiT's class readout is the mean of its two prefix tokens; it counts as one token."""
    model = tiny_model(backbone=backbone, glca_readout="cls+local", pwca=False, top_ratio=0.25).eval()
    P = model.num_prefix_tokens
    x = glca_input(model)
    index = TWO_SELECTIONS[0]
    normed = model.glca_norm(model.glca_block(x))
    cls = normed[:, :P].mean(dim=1)  # (B, C)
    expected = torch.cat([cls[:, None], gathered(normed, index, P)], dim=1).mean(dim=1)
    torch.testing.assert_close(model._glca(x, index)[0], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backbone", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
@torch.no_grad()
def test_glca_classifies_its_readout_by_the_rule_sa_uses(images, backbone):
    """GLCA starts as a copy of block L, its norm and its head(s), and with the class readout over
    all keys its prefix rows are block L's: so before training its logits are SA's. For a distilled
    DeiT that holds only if GLCA, like SA, averages head(class token) and head_dist(distillation
    token) rather than applying one head to the mean of the two."""
    model = tiny_model(backbone=backbone, pwca=False).eval()
    if model.glca_head_dist is not None:  # make the two classifiers clearly different
        torch.nn.init.normal_(model.backbone.head_dist.weight, std=1.0)
        model.glca_head_dist.load_state_dict(model.backbone.head_dist.state_dict())
    out = model(images)
    torch.testing.assert_close(out.glca_logits, out.sa_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.glca_features, out.sa_features, atol=1e-5, rtol=1e-5)


# glca_select


@torch.no_grad()
def test_random_selection_draws_new_patches_and_follows_the_seed(images):
    model = tiny_model(glca_select="random", pwca=False, top_ratio=0.25).eval()
    torch.manual_seed(3)
    first = model(images).local_index
    second = model(images).local_index
    torch.manual_seed(3)
    again = model(images).local_index
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    assert first.shape == (4, 4) and all(len(set(row)) == 4 for row in first.tolist())
    assert int(first.min()) >= 0 and int(first.max()) < 16


@pytest.mark.parametrize("mode", ["train_grad", "train_checkpointed", "eval_no_grad"])
def test_last_selection_is_top_k_of_the_last_blocks_map(mode, images):
    model = tiny_model(
        glca_select="last", pwca=False, top_ratio=0.25, grad_checkpointing="checkpointed" in mode
    )
    twin = timm_twin(model, "deit_tiny_patch16_224").eval()
    maps = []
    last = twin.blocks[-1].attn
    last.fused_attn = False
    last.attn_drop.register_forward_hook(lambda m, inp, out: maps.append(inp[0]))
    with torch.no_grad():
        twin(images)
    cls_row = maps[0].mean(dim=1)[:, 0, 1:]  # (B, P): block L's head-averaged class row over patches
    expected = cls_row.topk(4, dim=1).indices
    if mode == "eval_no_grad":
        with torch.no_grad():
            out = model.eval()(images)
    else:
        out = model.train()(images)
    assert torch.equal(out.local_index, expected)
    assert not torch.equal(out.rollout.topk(4, dim=1).indices, expected)  # the choice is not rollout's


# glca_kv


@pytest.mark.parametrize("readout", ["cls", "local", "cls+local"])
@torch.no_grad()
def test_local_kv_attends_over_the_prefix_and_selected_tokens_only(readout):
    model = tiny_model(glca_kv="local", glca_readout=readout, pwca=False, top_ratio=0.25).eval()
    x = glca_input(model)
    index = TWO_SELECTIONS[0]
    tokens = torch.cat([x[:, :1], gathered(x, index)], dim=1)  # (B, 1 + k, C) the only keys/values
    normed = model.glca_norm(hand_block(model.glca_block, tokens, tokens))
    expected = {"cls": normed[:, 0], "local": normed[:, 1:].mean(dim=1), "cls+local": normed.mean(dim=1)}
    torch.testing.assert_close(model._glca(x, index)[0], expected[readout], atol=1e-5, rtol=1e-5)
    global_kv = tiny_model(glca_readout=readout, pwca=False, top_ratio=0.25).eval()
    global_kv.load_state_dict(model.state_dict())
    assert (global_kv._glca(x, index)[0] - expected[readout]).abs().max() > 1e-3


# pwca_blocks


def dcal_loss(model, images: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
    """The sum of the branch cross-entropies (of the branches the model runs)."""
    out = model(images, pair_index=pairs)
    labels = torch.tensor([0, 1, 2, 3])
    logits = [t for t in (out.sa_logits, out.glca_logits, out.pwca_logits) if t is not None]
    return sum(F.cross_entropy(t, labels) for t in logits)


def hand_pwca_logits(model, images: torch.Tensor, pairs: torch.Tensor, T: int) -> torch.Tensor:
    """SA blocks up to block L - T, then T blocks whose keys/values are [own; SA tokens of the
    distractor at that block]."""
    bb = model.backbone
    sa = bb._pos_embed(bb.patch_embed(images))
    inputs = []
    for block in bb.blocks:
        inputs.append(sa)
        sa = block(sa)
    depth = len(bb.blocks)
    pw = inputs[depth - T] if T else sa
    for i in range(depth - T, depth):
        pw = hand_block(bb.blocks[i], pw, torch.cat([pw, inputs[i][pairs]], dim=1))
    return bb.head(bb.norm(pw)[:, 0])


@pytest.mark.parametrize("blocks", [0, 1, 2, "all"])
def test_pwca_in_the_last_t_blocks_matches_a_hand_written_stream(blocks, images):
    model = tiny_model(glca=False, pwca_blocks=blocks).train()
    T = 3 if blocks == "all" else blocks
    assert model.pwca_blocks == T
    out = model(images, pair_index=PAIRS)
    torch.testing.assert_close(
        out.pwca_logits, hand_pwca_logits(model, images, PAIRS, T), atol=1e-5, rtol=1e-5
    )
    with torch.no_grad():
        torch.testing.assert_close(
            model(images, pair_index=PAIRS).pwca_logits, out.pwca_logits, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("grad", [True, False])
def test_no_pwca_block_gives_the_sa_logits(grad, images):
    model = tiny_model(pwca_blocks=0).train()
    with torch.set_grad_enabled(grad):
        out = model(images, pair_index=PAIRS)
    assert torch.equal(out.pwca_logits, out.sa_logits)


def test_pwca_cost_falls_with_t(images):
    """Each PWCA block dropped saves work, and the blocks before the branch point are not run
    twice: with T = 0 a step costs what it costs without PWCA, plus one more norm and head."""

    def step_flops(**kwargs) -> int:
        model = tiny_model(glca=False, **kwargs).train()
        return count_flops(lambda: dcal_loss(model, images).backward())

    flops = [step_flops(pwca_blocks=blocks) for blocks in (3, 2, 1, 0)]
    assert flops == sorted(flops, reverse=True) and len(set(flops)) == 4
    without = step_flops(pwca=False)
    assert without < flops[-1] < 1.02 * without


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_identity_pairs_make_pwca_equal_sa_for_every_t(blocks, checkpointed, images):
    model = tiny_model(pwca_blocks=blocks, grad_checkpointing=checkpointed).train()
    out = model(images, pair_index=torch.arange(4))
    torch.testing.assert_close(out.pwca_logits, out.sa_logits, atol=1e-5, rtol=1e-5)
    assert (model(images, pair_index=PAIRS).pwca_logits - out.sa_logits).abs().max() > 1e-3


# Every combination keeps the guarantees


COMBINATIONS = [
    {},
    {"glca_readout": "local"},
    {"glca_readout": "cls+local"},
    {"glca_readout": "cls", "glca_kv": "local", "glca_select": "last"},
    {"glca_readout": "cls+local", "glca_kv": "local", "glca_select": "random", "pwca_blocks": 1},
    {"glca_readout": "local", "pwca_blocks": 0},
]


@pytest.mark.parametrize("switches", COMBINATIONS, ids=str)
def test_every_parameter_gets_a_gradient(switches, images):
    model = tiny_model(drop_path_rate=0.1, top_ratio=0.25, **switches).train()
    dcal_loss(model, images).backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert missing == []


def test_checkpointing_gives_the_same_gradients_with_the_switches(images):
    switches = dict(glca_readout="local", glca_kv="local", glca_select="last", pwca_blocks=2, top_ratio=0.25)
    plain = tiny_model(**switches)
    checkpointed = tiny_model(grad_checkpointing=True, **switches)
    checkpointed.load_state_dict(plain.state_dict())
    for model in (plain, checkpointed):
        dcal_loss(model.train(), images, PAIRS).backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_without_branches_the_switches_leave_the_timm_model(images):
    model = tiny_model(glca=False, pwca=False, **SWITCHES).train()
    twin = timm_twin(model, "deit_tiny_patch16_224").train()
    torch.testing.assert_close(model(images).sa_logits, twin(images), atol=1e-5, rtol=1e-5)


# Validation, config, checkpoints


READOUT = r"model.glca_readout must be one of \['cls', 'local', 'cls\+local'\]"
SELECT = r"model.glca_select must be one of \['rollout', 'last', 'random'\]"
KV = r"model.glca_kv must be one of \['global', 'local'\]"
DEPTH = r"model.pwca_blocks must be 'all' or an integer in \[0, 3\] \(the backbone has 3 blocks\)"
NEGATIVE = r"model.pwca_blocks must be 'all' or an integer >= 0"
BAD_SWITCHES = [  # key, value, the model's error, the config's (None: only the model knows the depth)
    ("glca_readout", "mean", READOUT, READOUT),
    ("glca_select", "top", SELECT, SELECT),
    ("glca_kv", "all", KV, KV),
    ("pwca_blocks", 4, DEPTH, None),
    ("pwca_blocks", -1, DEPTH, NEGATIVE),
    ("pwca_blocks", "half", DEPTH, NEGATIVE),
    ("pwca_blocks", True, DEPTH, r"model.pwca_blocks: expected int \| str, got True"),
]


@pytest.mark.parametrize(("key", "value", "model_says", "config_says"), BAD_SWITCHES)
def test_model_and_config_refuse_bad_switches(key, value, model_says, config_says):
    with pytest.raises(ValueError, match=model_says):
        tiny_model(**{key: value})
    if config_says is None:
        load_config(None, [f"model.{key}={value}"])
    else:
        with pytest.raises(ConfigError, match=config_says):
            load_config(None, [f"model.{key}={str(value).lower()}"])


def test_config_switches_reach_the_model():
    kwargs = ", ".join(f"{k}: {v}" for k, v in TINY_KWARGS.items())
    overrides = [f"model.{k}={v}" for k, v in SWITCHES.items()]
    cfg = load_config(
        None,
        overrides + ["model.pretrained=false", f"model.backbone_kwargs={{{kwargs}}}", "data.img_size=32"],
    )
    assert cfg.model.pwca_blocks == 1 and isinstance(cfg.model.pwca_blocks, int)
    model = build_model(cfg, num_classes=5)
    assert {k: getattr(model, k) for k in SWITCHES} == SWITCHES
    assert load_config(None, []).model.pwca_blocks == "all"


def test_checkpoints_record_the_switches_and_resume_refuses_a_change(cub_root, tmp_path):
    result = run(cub_root, tmp_path, "train.epochs=1", "model.glca_select=last", "model.pwca_blocks=1")
    last = result.run_dir / "checkpoints" / "last.pt"
    assert load_checkpoint(last)["config"]["model"]["pwca_blocks"] == 1
    model = load_trained(last).model
    assert (model.glca_select, model.pwca_blocks, model.glca_readout) == ("last", 1, "cls")
    assert not {f"model.{k}" for k in SWITCHES} & RESUME_MAY_CHANGE
    with pytest.raises(ValueError, match=r"model.glca_readout: 'cls' -> 'local'"):
        run(cub_root, tmp_path, "train.epochs=1", "model.glca_select=last", "model.pwca_blocks=1",
            "model.glca_readout=local", resume="auto")  # fmt: skip
