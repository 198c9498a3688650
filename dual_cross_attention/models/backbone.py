"""Build the timm Vision Transformer that DCAL drives, load pretrained weights into it, and run
its model-level parts (embedding, classifier head): the only module that reads
``VisionTransformer`` internals.

DCAL runs timm's blocks with its own forward, so only the plain pre-norm ``Block`` with the
standard ``Attention`` is accepted; anything else is refused at build time with the reason,
rather than producing a model that silently computes something different.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import timm
import torch
from timm.layers import Attention
from timm.models import load_state_dict
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer, checkpoint_filter_fn
from torch import nn

from ..errors import UsageError

_logger = logging.getLogger(__name__)

# timm modules whose models are VisionTransformer (or its distilled subclass).
VIT_MODULES = ("vision_transformer", "vision_transformer_hybrid", "deit")
HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")


class UnsupportedBackboneError(UsageError):
    """The timm model cannot be driven by DCAL (wrong family or a feature DCAL does not model)."""


def create_backbone(
    name: str,
    num_classes: int,
    img_size: int,
    pretrained: bool,
    pretrained_path: str | None,
    drop_path_rate: float,
    backbone_kwargs: dict | None,
) -> VisionTransformer:
    """Create a timm ``VisionTransformer`` sized for ``img_size`` with a ``num_classes`` head.

    Args:
        name: timm model name, optionally with a pretrained tag (``vit_base_patch16_224.augreg_in21k``).
        num_classes: classes of the fine-grained task (the head is re-initialised for them).
        img_size: training resolution; pretrained position embeddings are resized to it.
        pretrained: start from pretrained weights, from ``pretrained_path`` if given, else from
            timm's hub (needs network access).
        pretrained_path: a local ``.safetensors``, ``.pth`` or ``.npz`` file.
        drop_path_rate: stochastic depth rate of the last block (linear over depth).
        backbone_kwargs: extra keyword arguments for ``timm.create_model``.
    """
    if pretrained_path is not None and not pretrained:
        raise ValueError(
            f"model.pretrained_path is set ({pretrained_path}) but model.pretrained is false. "
            "Set model.pretrained: true to load that file, or remove model.pretrained_path."
        )
    if not timm.is_model(name):
        close = difflib.get_close_matches(name.split(".")[0], timm.list_models(), n=5)
        raise ValueError(f"Unknown timm model '{name}' in model.backbone. Close matches: {close}")
    if not timm.models.is_model_in_modules(timm.models.get_arch_name(name), VIT_MODULES):
        raise UnsupportedBackboneError(
            f"model.backbone '{name}' is not a timm VisionTransformer; DCAL needs one of the families in "
            f"timm's {VIT_MODULES} modules (vit_*, deit_*, vit_*_r50_* hybrids)."
        )
    kwargs = dict(
        num_classes=num_classes, img_size=img_size, drop_path_rate=drop_path_rate, **(backbone_kwargs or {})
    )
    from_hub = pretrained and pretrained_path is None
    try:
        model = timm.create_model(name, pretrained=from_hub, **kwargs)
    except OSError as err:
        if not from_hub:
            raise
        raise RuntimeError(
            f"Could not fetch pretrained weights for '{name}' from the timm hub ({err}). Without network "
            "access, download the weights elsewhere and set model.pretrained_path to the local "
            ".safetensors / .pth / .npz file, or set model.pretrained: false to train from scratch."
        ) from err
    check_supported(model, name)
    if pretrained_path is not None:
        load_pretrained_weights(model, pretrained_path)
    return model


def check_supported(model: nn.Module, name: str) -> None:
    """Refuse models whose forward DCAL would not reproduce exactly."""
    if not isinstance(model, VisionTransformer):
        raise UnsupportedBackboneError(
            f"model.backbone '{name}' builds a {type(model).__name__}; DCAL needs a timm VisionTransformer "
            "(vit_*, deit_*, vit_*_r50_* hybrids)."
        )
    if model.cls_token is None or model.global_pool != "token" or model.attn_pool is not None:
        raise UnsupportedBackboneError(
            f"model.backbone '{name}' does not classify from a class token (global_pool="
            f"'{model.global_pool}'); attention rollout and GLCA read the class token. Use a class-token "
            "ViT or pass backbone_kwargs {global_pool: token, class_token: true}."
        )
    if not isinstance(model.patch_drop, nn.Identity):
        raise UnsupportedBackboneError(
            "patch dropout drops tokens, so rollout scores would no longer map to patches; set "
            "backbone_kwargs.patch_drop_rate: 0."
        )
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if type(block) is not Block or type(attn) is not Attention:
            raise UnsupportedBackboneError(
                f"model.backbone '{name}' block {i} is {type(block).__name__} with attention "
                f"{type(attn).__name__}; DCAL drives the standard pre-norm timm Block/Attention only."
            )
        if getattr(block.attn, "gate", None) is not None:
            raise UnsupportedBackboneError(
                f"model.backbone '{name}' uses gated attention, which DCAL does not model."
            )


def load_pretrained_weights(model: VisionTransformer, path: str) -> None:
    """Load a local checkpoint into ``model``, checking exactly which keys did not match.

    The position embedding is resized to the model's grid. Classifier keys (``head.*``,
    ``head_dist.*``) may be absent or of another shape (a different label set); they keep their
    fresh initialisation. Any other missing or unexpected key is an error naming the keys.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model.pretrained_path: no file at {file}")
    if file.suffix == ".npz":
        _load_npz(model, file)
        return
    if file.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ValueError(f"model.pretrained_path {file}: expected a .safetensors, .pth/.pt/.bin or .npz file")
    state = checkpoint_filter_fn(load_state_dict(str(file), use_ema=False), model)
    own = model.state_dict()
    skipped_head = {k for k in HEAD_KEYS if k in state and k in own and state[k].shape != own[k].shape}
    for key in skipped_head:
        del state[key]
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - set(HEAD_KEYS)
    unexpected = set(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"model.pretrained_path {file} does not fit the backbone: missing keys {sorted(missing)[:10]} "
            f"(of {len(missing)}), unexpected keys {sorted(unexpected)[:10]} (of {len(unexpected)}). "
            "Check that model.backbone names the architecture these weights were trained with."
        )
    new_head = sorted(skipped_head | (set(result.missing_keys) & set(HEAD_KEYS)))
    _logger.info("Loaded pretrained weights from %s; freshly initialised: %s", file, new_head or "nothing")


def _load_npz(model: VisionTransformer, file: Path) -> None:
    """Big-vision / JAX ``.npz`` checkpoints, through timm's converter (resizes position embeddings)."""
    try:
        model.load_pretrained(str(file))
    except KeyError as err:
        raise ValueError(
            f"model.pretrained_path {file}: the .npz has no array {err} that this backbone needs; check "
            "that model.backbone names the architecture these weights were trained with."
        ) from err
    _logger.info("Loaded pretrained .npz weights from %s", file)


def embed(model: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The tokens block 1 receives, as in timm's ``forward_features``: patch embedding, prefix
    tokens and position embedding, patch dropout, pre-norm.

    Args:
        images: (B, 3, H, W).

    Returns:
        (B, N, C), prefix tokens first.
    """
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))


def pooled_features(model: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The pre-logits features (B, C) of final-norm ``tokens`` (B, N, C): timm's
    ``forward_head(pre_logits=True)``, the class token (the mean of class and distillation
    tokens for a distilled DeiT) after fc_norm and head dropout."""
    return model.forward_head(tokens, pre_logits=True)


def head_outputs(
    model: VisionTransformer,
    tokens: torch.Tensor,
    head: nn.Module | None = None,
    head_dist: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-logits features and logits from one pass through the head, so head dropout draws one
    mask for both.

    For a plain ViT the logits are ``head(features)``. A distilled DeiT's logits average
    head(class token) and head_dist(distillation token) while its features average the two
    tokens, so its logits are not head(features); both are built here from the same dropped
    tokens, as its ``forward_head`` does.

    Args:
        tokens: (B, N, C) output of the final norm (or P prefix tokens holding a readout).
        head, head_dist: the classifiers to apply, by default the backbone's own; GLCA passes
            its copies so that its readout is classified by exactly SA's rule.

    Returns:
        features (B, C) and logits (B, K), those of ``forward_head(tokens, pre_logits=True)`` and
        ``forward_head(tokens)``.
    """
    head = model.head if head is None else head
    if isinstance(model, VisionTransformerDistilled):
        head_dist = model.head_dist if head_dist is None else head_dist
        cls, dist = model.head_drop(tokens[:, 0]), model.head_drop(tokens[:, 1])  # (B, C) each
        return (cls + dist) / 2, (head(cls) + head_dist(dist)) / 2
    features = pooled_features(model, tokens)
    return features, head(features)


@torch.no_grad()
def backbone_summary(model: VisionTransformer) -> str:
    """One line that names what was built, for the run log."""
    params = sum(p.numel() for p in model.parameters())
    grid = model.patch_embed.grid_size
    return (
        f"{type(model).__name__} depth={len(model.blocks)} dim={model.embed_dim} grid={grid[0]}x{grid[1]} "
        f"prefix_tokens={model.num_prefix_tokens} params={params / 1e6:.2f}M"
    )
