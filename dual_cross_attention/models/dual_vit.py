"""The DCAL model: a timm Vision Transformer driven as three streams.

- SA: the backbone's L blocks on image I1 (the usual ViT).
- PWCA (training only): the same L blocks, starting from I1's embeddings; at each block the
  keys/values are [own; SA keys/values of the distractor I2], which the SA stream of I2 has
  already computed, so I2 is never run twice.
- GLCA (M=1): its own block, a copy of block L, in parallel with block L. Queries are the prefix
  tokens plus the top-R patches by attention rollout; keys/values are all tokens of block L's
  input. Its class token goes through its own norm and head.

This module only wires the streams: ``blocks`` runs one timm block as an SA, PWCA or GLCA
step, ``rollout`` scores the patches, ``backbone`` embeds the images and applies the head.
Rollout needs head-averaged maps but no gradient: in training they are recomputed from the
queries/keys that autograd keeps anyway; without autograd the attention is computed
explicitly once and its maps are reused.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from .backbone import create_backbone, embed, head_outputs, pooled_features
from .blocks import glca_block, pwca_block, queries_keys, sa_block, sa_block_with_map
from .rollout import num_local_tokens, rollout_cls_row, rollout_from_qk, select_local_tokens

PREDICT_MODES = ("sa", "glca", "sa+glca")


@dataclass
class DualViTOutput:
    """Named outputs of ``DualViT.forward``. Shapes: B images, K classes, C width, P patches, k picked."""

    sa_logits: torch.Tensor  # (B, K)
    sa_features: torch.Tensor  # (B, C) pre-head class-token embedding
    glca_logits: torch.Tensor | None = None  # (B, K); None when GLCA is off
    glca_features: torch.Tensor | None = None  # (B, C)
    pwca_logits: torch.Tensor | None = None  # (B, K); None in eval mode or when PWCA is off
    rollout: torch.Tensor | None = None  # (B, P) class-token rollout row over patches; None without GLCA
    local_index: torch.Tensor | None = None  # (B, k) patches picked as GLCA queries, highest rollout first


def random_derangement(n: int, device: torch.device | str | None = None, tries: int = 32) -> torch.Tensor:
    """A uniformly random permutation of range(n) with no fixed point (n >= 2), drawn on ``device``
    without a host-device sync.

    ``tries`` uniform permutations are drawn at once and the first without a fixed point is kept
    (exact rejection sampling). Only if all of them have one, with probability at most 2^-tries
    (about (1 - 1/e)^tries for large n), a random rotation of the identity is used instead:
    still a derangement, and the choice is made on the device (``torch.where``), not the host.
    """
    perms = torch.rand(tries, n, device=device).argsort(dim=1)  # (tries, n) uniform permutations
    identity = torch.arange(n, device=device)
    valid = (perms != identity).all(dim=1)  # (tries,)
    first = valid.float().argmax()  # index of the first valid one (0 when none is)
    shift = torch.randint(1, n, (), device=device)
    rotation = (identity + shift) % n
    return torch.where(valid.any(), perms[first], rotation)


class DualViT(nn.Module):
    def __init__(
        self,
        backbone: str,
        num_classes: int,
        img_size: int = 448,
        pretrained: bool = True,
        pretrained_path: str | None = None,
        top_ratio: float = 0.1,
        glca: bool = True,
        pwca: bool = True,
        drop_path_rate: float = 0.1,
        grad_checkpointing: bool = False,
        backbone_kwargs: dict | None = None,
    ) -> None:
        """DCAL over a timm Vision Transformer.

        Args:
            backbone: timm model name (``deit_tiny_patch16_224``, ``vit_base_patch16_224.augreg_in21k``,
                ``vit_base_r50_s16_224``, ``deit_small_distilled_patch16_224``, ...).
            num_classes: number of classes; SA/PWCA share the backbone head, GLCA has its own.
            img_size: input resolution (square).
            pretrained: start from pretrained weights (``pretrained_path`` if set, else timm's hub).
            pretrained_path: local ``.safetensors`` / ``.pth`` / ``.npz`` weights for the backbone.
            top_ratio: R, the fraction of patches GLCA uses as local queries (0.1 for FGVC).
            glca: build the global-local cross-attention branch.
            pwca: run the pair-wise cross-attention branch in training.
            drop_path_rate: stochastic depth rate.
            grad_checkpointing: recompute each block in backward instead of storing activations.
            backbone_kwargs: extra ``timm.create_model`` arguments (e.g. a small ViT for CPU runs).
        """
        super().__init__()
        if not 0.0 < top_ratio <= 1.0:
            raise ValueError(f"model.top_ratio must be in (0, 1], got {top_ratio}")
        self.backbone = create_backbone(
            backbone, num_classes, img_size, pretrained, pretrained_path, drop_path_rate, backbone_kwargs
        )
        self.num_classes = num_classes
        self.top_ratio = top_ratio
        self.use_glca = glca
        self.use_pwca = pwca
        self.grad_checkpointing = grad_checkpointing
        self.num_prefix_tokens = self.backbone.num_prefix_tokens
        self.num_patches = self.backbone.patch_embed.num_patches
        if glca:
            # Copies of a (possibly pretrained) last block, norm and head: GLCA starts where SA is.
            self.glca_block = copy.deepcopy(self.backbone.blocks[-1])
            self.glca_norm = copy.deepcopy(self.backbone.norm)
            self.glca_head = copy.deepcopy(self.backbone.head)

    @property
    def num_local_tokens(self) -> int:
        return num_local_tokens(self.top_ratio, self.num_patches)

    def forward(self, images: torch.Tensor, pair_index: torch.Tensor | None = None) -> DualViTOutput:
        """Run the streams; PWCA only in training mode.

        Args:
            images: (B, 3, H, W).
            pair_index: (B,) long, the in-batch index of each image's distractor for PWCA. Drawn as
                a random derangement when omitted.
        """
        run_pwca = self.use_pwca and self.training
        if run_pwca:
            pair_index = self._check_pair_index(images.shape[0], pair_index, images.device)
        bb = self.backbone
        x = embed(bb, images)  # (B, N, C)
        if torch.is_grad_enabled():
            sa, pw, last_input, rollout = self._blocks_with_grad(x, pair_index if run_pwca else None)
        else:
            sa, pw, last_input, rollout = self._blocks_without_grad(x, pair_index if run_pwca else None)

        sa_features, sa_logits = head_outputs(bb, bb.norm(sa))
        out = DualViTOutput(sa_logits=sa_logits, sa_features=sa_features)
        if pw is not None:
            out.pwca_logits = head_outputs(bb, bb.norm(pw))[1]
        if self.use_glca:
            out.rollout = rollout[:, self.num_prefix_tokens :]
            out.local_index = select_local_tokens(out.rollout, self.num_local_tokens)
            out.glca_features = self._glca(last_input, out.local_index)
            out.glca_logits = self.glca_head(out.glca_features)
        return out

    def _blocks_with_grad(
        self, x: torch.Tensor, pair_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Fused attention through all blocks; rollout afterwards from the kept queries/keys.

        Returns: SA tokens after block L, PWCA tokens (or None), block L's input, rollout row (or None).
        """
        pw = x if pair_index is not None else None
        inputs, qk = [], []
        for block in self.backbone.blocks:
            inputs.append(x)
            if self.grad_checkpointing:
                x, pw, q, k = checkpoint(self._sa_pwca_block, block, x, pw, pair_index, use_reentrant=False)
            else:
                x, pw, q, k = self._sa_pwca_block(block, x, pw, pair_index)
            # Without checkpointing, q/k are views of tensors autograd keeps anyway: free to hold.
            # With it, holding them would undo the saving, so rollout recomputes them from the
            # block inputs that checkpointing keeps.
            qk.append(None if self.grad_checkpointing else (q, k))
        rollout = None
        if self.use_glca:
            blocks = list(self.backbone.blocks)
            last_first = zip(reversed(blocks), reversed(inputs), reversed(qk), strict=True)
            rollout = rollout_from_qk(pair or queries_keys(b, inp) for b, inp, pair in last_first)
        return x, pw, inputs[-1], rollout

    def _blocks_without_grad(
        self, x: torch.Tensor, pair_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Explicit attention (no autograd): the maps it computes anyway are reused for rollout."""
        pw = x if pair_index is not None else None
        maps = []
        last_input = x
        for block in self.backbone.blocks:
            last_input = x
            x, k, v, head_mean = sa_block_with_map(block, x)
            maps.append(head_mean)
            if pw is not None:
                pw = pwca_block(block, pw, k.index_select(0, pair_index), v.index_select(0, pair_index))
        rollout = rollout_cls_row(maps[-1][:, 0], reversed(maps[:-1])) if self.use_glca else None
        return x, pw, last_input, rollout

    @staticmethod
    def _sa_pwca_block(
        block: Block, x: torch.Tensor, pw: torch.Tensor | None, pair_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """One block of the SA stream and, when given, of the PWCA stream (one checkpoint unit)."""
        x, q, k, v = sa_block(block, x)  # q, k, v: (B, nh, N, hd)
        if pw is not None:
            pw = pwca_block(block, pw, k.index_select(0, pair_index), v.index_select(0, pair_index))
        return x, pw, q.detach(), k.detach()

    def _check_pair_index(
        self, batch_size: int, pair_index: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        if batch_size < 2:
            raise ValueError(
                "PWCA pairs every image with another image of the same batch, so a training batch needs at "
                f"least 2 images (got {batch_size}). Use train.batch_size >= 2 with drop_last so no batch of "
                "1 is left over, or set model.pwca: false."
            )
        if pair_index is None:
            return random_derangement(batch_size, device)
        if pair_index.shape != (batch_size,) or pair_index.dtype != torch.long:
            raise ValueError(
                f"pair_index must be a LongTensor of shape ({batch_size},), got {pair_index.dtype} "
                f"{tuple(pair_index.shape)}"
            )
        if bool((pair_index < 0).any()) or bool((pair_index >= batch_size).any()):
            raise ValueError(
                f"pair_index values must index the batch, in [0, {batch_size}): {pair_index.tolist()}"
            )
        return pair_index.to(device)

    def _glca(self, x: torch.Tensor, local_index: torch.Tensor) -> torch.Tensor:
        """GLCA on block L's input ``x`` (B, N, C); returns pooled class-token features (B, C)."""
        B = x.shape[0]
        prefix = torch.arange(self.num_prefix_tokens, device=x.device).expand(B, -1)
        rows = torch.cat([prefix, local_index + self.num_prefix_tokens], dim=1)  # (B, P + k)
        if self.grad_checkpointing and torch.is_grad_enabled():
            tokens = checkpoint(glca_block, self.glca_block, x, rows, use_reentrant=False)
        else:
            tokens = glca_block(self.glca_block, x, rows)
        return pooled_features(self.backbone, self.glca_norm(tokens))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, mode: str = "sa+glca") -> torch.Tensor:
        """Class probabilities (B, K) in inference mode; ``sa+glca`` sums the two softmax outputs.

        Runs in eval mode (no PWCA, no dropout) and restores the previous mode afterwards.
        """
        if mode not in PREDICT_MODES:
            raise ValueError(f"mode must be one of {PREDICT_MODES}, got '{mode}'")
        if mode != "sa" and not self.use_glca:
            raise ValueError(f"mode '{mode}' needs the GLCA branch, but this model was built with glca=False")
        was_training = self.training
        self.eval()
        try:
            out = self(images)
        finally:
            self.train(was_training)
        return combine_probabilities(out, mode)


def combine_probabilities(out: DualViTOutput, mode: str) -> torch.Tensor:
    """softmax(SA), softmax(GLCA) or their sum, as the paper's inference rule."""
    if mode == "sa":
        return F.softmax(out.sa_logits.float(), dim=-1)
    if mode == "glca":
        return F.softmax(out.glca_logits.float(), dim=-1)
    return F.softmax(out.sa_logits.float(), dim=-1) + F.softmax(out.glca_logits.float(), dim=-1)
