"""The DCAL model: a timm Vision Transformer driven as three streams.

- SA: the backbone's L blocks on image I1 (the usual ViT).
- PWCA (training only): the same blocks; in each of the last T (``pwca_blocks``, default all L)
  the keys/values are [own; SA keys/values of the distractor I2], which the SA stream of I2 has
  already computed, so I2 is never run twice. Before those blocks the PWCA stream would be I1's
  SA stream, so it branches off the SA hidden state instead of recomputing it.
- GLCA (M=1): its own block, a copy of block L, in parallel with block L, on block L's input.
  Local patches: the top-R by attention rollout (``glca_select``: or by block L's map alone, or
  at random). Keys/values: all tokens (``glca_kv``: or the prefix and local tokens only).
  Readout (``glca_readout``): the class token, the mean of the local tokens, or of both, after
  GLCA's own norm, into its own head. Only the query rows that reach the readout are run.

This module only wires the streams: ``blocks`` runs one timm block as an SA, PWCA or GLCA
step, ``rollout`` scores the patches, ``backbone`` embeds the images and applies the head.
Rollout needs the class row times each head-averaged map but no gradient, and no N x N map is
built for it: every block runs fused attention and keeps its log-sum-exp (``fused_lse``), and
the rollout recomputes the scores tile by tile from the kept queries/keys (``rollout``). Where
no kernel returns the log-sum-exp, inference falls back to explicit attention and reuses its
maps, and the log says so once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UsageError
from .backbone import create_backbone, embed, head_outputs
from .blocks import glca_block, pwca_block, queries_keys, sa_block, sa_block_with_map
from .bnneck import BNNeckHead
from .fused_lse import lse_available
from .pairs import pwca_pairs
from .rollout import (
    cls_attention_row,
    num_local_tokens,
    rollout_cls_row,
    rollout_from_qk,
    select_local_tokens,
    select_random_tokens,
)

PREDICT_MODES = ("sa", "glca", "sa+glca")
GLCA_READOUTS = ("cls", "local", "cls+local")
GLCA_SELECTS = ("rollout", "last", "random")
GLCA_KVS = ("global", "local")


@dataclass
class DualViTOutput:
    """Named outputs of ``DualViT.forward``. Shapes: B images, K classes, C width, P patches, k picked."""

    sa_logits: torch.Tensor  # (B, K)
    sa_features: torch.Tensor  # (B, C) pre-head class-token embedding
    glca_logits: torch.Tensor | None = None  # (B, K); None when GLCA is off
    glca_features: torch.Tensor | None = None  # (B, C)
    pwca_logits: torch.Tensor | None = None  # (B, K); None in eval mode or when PWCA is off
    pwca_features: torch.Tensor | None = None  # (B, C); with pwca_logits (Re-ID's triplet loss)
    rollout: torch.Tensor | None = None  # (B, P) class-token rollout row over patches; None without GLCA
    local_index: torch.Tensor | None = None  # (B, k) patches picked for GLCA, highest score first


@dataclass
class Streams:
    """What the block loop hands on. Shapes: B images, N tokens, C width."""

    sa: torch.Tensor  # (B, N, C) SA tokens after block L
    pwca: torch.Tensor | None  # (B, N, C) PWCA tokens after block L; None without PWCA
    last_input: torch.Tensor  # (B, N, C) block L's input: GLCA's input
    rollout: torch.Tensor | None  # (B, N) class row of the rollout through block L; None without GLCA
    last_row: torch.Tensor | None  # (B, N) class row of block L's head-averaged map; for glca_select=last


class DualViT(nn.Module):
    def __init__(
        self,
        backbone: str,
        num_classes: int,
        img_size: int | tuple[int, int] = 448,
        pretrained: bool = True,
        pretrained_path: str | None = None,
        top_ratio: float = 0.1,
        glca: bool = True,
        pwca: bool = True,
        glca_readout: str = "cls",
        glca_select: str = "rollout",
        glca_kv: str = "global",
        pwca_blocks: int | str = "all",
        drop_path_rate: float = 0.1,
        grad_checkpointing: bool = False,
        backbone_kwargs: dict | None = None,
        bnneck: bool = False,
    ) -> None:
        """DCAL over a timm Vision Transformer.

        Args:
            backbone: timm model name (``deit_tiny_patch16_224``, ``vit_base_patch16_224.augreg_in21k``,
                ``vit_base_r50_s16_224``, ``deit_small_distilled_patch16_224``, ...).
            num_classes: number of classes; SA/PWCA share the backbone head, GLCA has its own.
            img_size: input resolution: a square side, or (height, width) (Re-ID: 256 x 128 persons).
            pretrained: start from pretrained weights (``pretrained_path`` if set, else timm's hub).
            pretrained_path: local ``.safetensors`` / ``.pth`` / ``.npz`` weights for the backbone.
            top_ratio: R, the fraction of patches GLCA uses as local queries (0.1 for FGVC).
            glca: build the global-local cross-attention branch.
            pwca: run the pair-wise cross-attention branch in training.
            glca_readout: what GLCA's head reads, after GLCA's norm: ``cls`` the prefix (class)
                token, ``local`` the mean of the local tokens, ``cls+local`` the mean of the class
                token and the local tokens. With ``cls`` and ``glca_kv=global`` the selection
                does not change the output (only the prefix queries are run).
            glca_select: how the local patches are picked: ``rollout`` top-R by the class row of
                the rollout through block L, ``last`` top-R by the class row of block L's own
                map, ``random`` R patches drawn at random in every forward.
            glca_kv: GLCA's keys/values: ``global`` all tokens of block L's input, ``local`` the
                prefix and local tokens only.
            pwca_blocks: ``all``, or T in [0, depth]: PWCA in the last T blocks only (T = 0 makes
                the PWCA logits the SA logits, up to dropout).
            drop_path_rate: stochastic depth rate.
            grad_checkpointing: recompute each block in backward instead of storing activations.
            backbone_kwargs: extra ``timm.create_model`` arguments (e.g. a small ViT for CPU runs).
            bnneck: replace the classifier(s) by ``BNNeckHead`` (batch norm, then a bias-free
                linear layer), as Re-ID models do; ``neck_features`` gives the retrieval feature.
        """
        super().__init__()
        if not 0.0 < top_ratio <= 1.0:
            raise UsageError(f"model.top_ratio must be in (0, 1], got {top_ratio}")
        for name, value, valid in (
            ("glca_readout", glca_readout, GLCA_READOUTS),
            ("glca_select", glca_select, GLCA_SELECTS),
            ("glca_kv", glca_kv, GLCA_KVS),
        ):
            if value not in valid:
                raise UsageError(f"model.{name} must be one of {list(valid)}, got {value!r}")
        self.backbone = create_backbone(
            backbone, num_classes, img_size, pretrained, pretrained_path, drop_path_rate, backbone_kwargs
        )
        if bnneck:
            if isinstance(self.backbone, VisionTransformerDistilled):
                raise UsageError(
                    f"model.backbone '{backbone}' is a distilled DeiT, whose two classifiers have no single "
                    "retrieval feature; use the non-distilled model of that size for Re-ID (reid.bnneck)"
                )
            self.backbone.head = BNNeckHead(self.backbone.embed_dim, num_classes)
        self.bnneck = bnneck
        self.num_classes = num_classes
        self.top_ratio = top_ratio
        self.use_glca = glca
        self.use_pwca = pwca
        self.glca_readout = glca_readout
        self.glca_select = glca_select
        self.glca_kv = glca_kv
        self.pwca_blocks = resolve_pwca_blocks(pwca_blocks, len(self.backbone.blocks))
        self.grad_checkpointing = grad_checkpointing
        self.num_prefix_tokens = self.backbone.num_prefix_tokens
        self.num_patches = self.backbone.patch_embed.num_patches
        if glca:
            # Copies of a (possibly pretrained) last block, norm and head: GLCA starts where SA is.
            self.glca_block = copy.deepcopy(self.backbone.blocks[-1])
            self.glca_norm = copy.deepcopy(self.backbone.norm)
            self.glca_head = copy.deepcopy(self.backbone.head)
            # A distilled DeiT classifies the class token with head and the distillation token
            # with head_dist; GLCA gets a copy of both and reads out by the same rule as SA.
            self.glca_head_dist = copy.deepcopy(getattr(self.backbone, "head_dist", None))

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
            pair_index = pwca_pairs(images.shape[0], pair_index, images.device)
        bb = self.backbone
        x = embed(bb, images)  # (B, N, C)
        blocks = self._blocks_with_grad if torch.is_grad_enabled() else self._blocks_without_grad
        streams = blocks(x, pair_index if run_pwca else None)

        sa_features, sa_logits = head_outputs(bb, bb.norm(streams.sa))
        out = DualViTOutput(sa_logits=sa_logits, sa_features=sa_features)
        if streams.pwca is not None:
            out.pwca_features, out.pwca_logits = head_outputs(bb, bb.norm(streams.pwca))
        if self.use_glca:
            P = self.num_prefix_tokens
            out.rollout = streams.rollout[:, P:]
            out.local_index = self._select_local(out.rollout, streams.last_row)
            out.glca_features, out.glca_logits = self._glca(streams.last_input, out.local_index)
        return out

    @property
    def pwca_start(self) -> int:
        """0-based index of the first block that runs PWCA (depth when T = 0)."""
        return len(self.backbone.blocks) - self.pwca_blocks

    def _branch_pwca(
        self, i: int, x: torch.Tensor, pw: torch.Tensor | None, pair_index: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The PWCA stream entering block ``i``: up to the first PWCA block it would equal I1's SA
        stream, so it branches off the SA tokens ``x`` there instead of being recomputed."""
        return x if pair_index is not None and i == self.pwca_start else pw

    def _blocks_with_grad(self, x: torch.Tensor, pair_index: torch.Tensor | None) -> Streams:
        """Fused attention through all blocks; rollout afterwards from the kept queries/keys and,
        where a log-sum-exp kernel exists (``fused_lse``), each block's lse."""
        with_lse = self.use_glca and lse_available(x, self.backbone.blocks[0].attn.head_dim)
        pw = None
        inputs, qk, lses = [], [], []
        for i, block in enumerate(self.backbone.blocks):
            pw = self._branch_pwca(i, x, pw, pair_index)
            inputs.append(x)
            args = (block, x, pw, pair_index, with_lse)
            if self.grad_checkpointing:
                x, pw, q, k, lse = checkpoint(self._sa_pwca_block, *args, use_reentrant=False)
            else:
                x, pw, q, k, lse = self._sa_pwca_block(*args)
            # Without checkpointing, q/k are views of tensors autograd keeps anyway: free to hold.
            # With it, holding them would undo the saving, so rollout recomputes them from the
            # block inputs that checkpointing keeps. lse (B, nh, N) is small enough to keep.
            qk.append(None if self.grad_checkpointing else (q, k))
            lses.append(lse)
        pw = self._branch_pwca(len(inputs), x, pw, pair_index)  # T = 0: no PWCA block
        rollout = last_row = None
        if self.use_glca:
            blocks = list(self.backbone.blocks)
            last_first = zip(reversed(blocks), reversed(inputs), reversed(qk), reversed(lses), strict=True)
            rollout = rollout_from_qk(
                (*(pair or queries_keys(b, inp)), lse) for b, inp, pair, lse in last_first
            )
            if self.glca_select == "last":
                last_row = cls_attention_row(*(qk[-1] or queries_keys(blocks[-1], inputs[-1])))
        return Streams(x, pw, inputs[-1], rollout, last_row)

    def _blocks_without_grad(self, x: torch.Tensor, pair_index: torch.Tensor | None) -> Streams:
        """No autograd. Where a log-sum-exp kernel exists (``fused_lse``) attention is fused, and
        each block keeps q, k (copies, so that its fused qkv is freed) and lse for rollout
        afterwards: O(N) per block. Elsewhere it is explicit and its N x N maps are reused."""
        blocks = self.backbone.blocks
        fused = not self.use_glca or lse_available(x, blocks[0].attn.head_dim)
        pw = None
        kept = []  # per block: (q, k, lse) when fused, else the head-averaged map (B, N, N)
        last_input = x
        for i, block in enumerate(blocks):
            pw = self._branch_pwca(i, x, pw, pair_index)
            last_input = x
            if fused:
                x, q, k, v, lse = sa_block(block, x, with_lse=self.use_glca)
                if self.use_glca:
                    kept.append((q.contiguous(), k.contiguous(), lse))
            else:
                x, k, v, head_mean = sa_block_with_map(block, x)
                kept.append(head_mean)
            if pw is not None:
                pw = pwca_block(block, pw, k.index_select(0, pair_index), v.index_select(0, pair_index))
        pw = self._branch_pwca(len(blocks), x, pw, pair_index)  # T = 0: no PWCA block
        rollout = last_row = None
        if self.use_glca and fused:
            rollout = rollout_from_qk(reversed(kept))
            last_row = cls_attention_row(*kept[-1][:2]) if self.glca_select == "last" else None
        elif self.use_glca:
            rollout = rollout_cls_row(kept[-1][:, 0], reversed(kept[:-1]))
            last_row = kept[-1][:, 0] if self.glca_select == "last" else None
        return Streams(x, pw, last_input, rollout, last_row)

    @staticmethod
    def _sa_pwca_block(
        block: Block,
        x: torch.Tensor,
        pw: torch.Tensor | None,
        pair_index: torch.Tensor | None,
        with_lse: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """One block of the SA stream and, when given, of the PWCA stream (one checkpoint unit);
        returns both streams' outputs, the SA q and k without autograd, and lse or None."""
        x, q, k, v, lse = sa_block(block, x, with_lse)  # q, k, v: (B, nh, N, hd)
        if pw is not None:
            pw = pwca_block(block, pw, k.index_select(0, pair_index), v.index_select(0, pair_index))
        return x, pw, q.detach(), k.detach(), lse

    def _select_local(self, rollout: torch.Tensor, last_row: torch.Tensor | None) -> torch.Tensor:
        """GLCA's local patches (B, k) by ``glca_select``, from the rollout over the patches
        (B, num_patches) or block L's class row over all tokens (B, N)."""
        k = self.num_local_tokens
        if self.glca_select == "rollout":
            return select_local_tokens(rollout, k)
        if self.glca_select == "last":
            return select_local_tokens(last_row[:, self.num_prefix_tokens :], k)
        return select_random_tokens(rollout.shape[0], rollout.shape[1], k, rollout.device)

    def _glca(self, x: torch.Tensor, local_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GLCA on block L's input ``x`` (B, N, C) with local patches ``local_index`` (B, k);
        returns the pooled readout features (B, C) and GLCA's logits (B, K), classified by the
        rule SA uses (``head_outputs``: for a distilled DeiT, head on the class position and
        head_dist on the distillation position, averaged)."""
        queries, context = self._glca_tokens(x, local_index)
        if self.grad_checkpointing and torch.is_grad_enabled():
            tokens = checkpoint(glca_block, self.glca_block, queries, context, use_reentrant=False)
        else:
            tokens = glca_block(self.glca_block, queries, context)
        readout = glca_readout_tokens(self.glca_norm(tokens), self.num_prefix_tokens, self.glca_readout)
        return head_outputs(self.backbone, readout, self.glca_head, self.glca_head_dist)

    def _glca_tokens(self, x: torch.Tensor, local_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """GLCA's query tokens, only those its readout reads (prefix, local, or prefix then local),
        and its key/value tokens (all of ``x``, or prefix then local)."""
        P = self.num_prefix_tokens
        prefix = x[:, :P]  # (B, P, C)
        if self.glca_readout == "cls" and self.glca_kv == "global":
            return prefix, x  # the selection cannot reach the output: nothing to gather
        local = x[:, P:].gather(1, local_index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, k, C)
        selected = torch.cat([prefix, local], dim=1)  # (B, P + k, C)
        queries = {"cls": prefix, "local": local, "cls+local": selected}[self.glca_readout]
        return queries, x if self.glca_kv == "global" else selected

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


def neck_features(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The retrieval feature of pre-head ``features`` (B, C): after the BNNeck's norm when
    ``head`` is a ``BNNeckHead``, else the features themselves."""
    return head.neck(features) if isinstance(head, BNNeckHead) else features


def resolve_pwca_blocks(pwca_blocks: int | str, depth: int) -> int:
    """T, the number of last blocks that run PWCA: ``all`` is the depth; an int must be in [0, depth]."""
    if pwca_blocks == "all":
        return depth
    if isinstance(pwca_blocks, bool) or not isinstance(pwca_blocks, int) or not 0 <= pwca_blocks <= depth:
        raise UsageError(
            f"model.pwca_blocks must be 'all' or an integer in [0, {depth}] (the backbone has {depth} "
            f"blocks), got {pwca_blocks!r}"
        )
    return pwca_blocks


def glca_readout_tokens(tokens: torch.Tensor, num_prefix: int, readout: str) -> torch.Tensor:
    """GLCA's normed query outputs turned into prefix tokens (B, P, C) that hold the readout, so
    the backbone's own pooling (class token; class and distillation tokens averaged for a
    distilled DeiT) and pre-logits layers apply to it unchanged.

    Args:
        tokens: (B, Nq, C) the outputs of ``_glca_tokens``'s queries after GLCA's norm: the P
            prefix tokens (``cls``), the k local tokens (``local``), or both (``cls+local``).
        readout: ``cls``: the prefix tokens. ``local``: every prefix position holds the mean of
            the local tokens. ``cls+local``: each prefix token averaged with the k local tokens,
            (t + sum local) / (k + 1), so the pooled prefix readout counts as one token among
            k + 1 (for a distilled DeiT the class/distillation mean, not each of them).
    """
    if readout == "cls":
        return tokens
    if readout == "local":
        return tokens.mean(dim=1, keepdim=True).expand(-1, num_prefix, -1)
    prefix, local = tokens[:, :num_prefix], tokens[:, num_prefix:]  # (B, P, C), (B, k, C)
    return (prefix + local.sum(dim=1, keepdim=True)) / (local.shape[1] + 1)


def combine_probabilities(out: DualViTOutput, mode: str) -> torch.Tensor:
    """softmax(SA), softmax(GLCA) or their sum, as the paper's inference rule."""
    if mode == "sa":
        return F.softmax(out.sa_logits.float(), dim=-1)
    if mode == "glca":
        return F.softmax(out.glca_logits.float(), dim=-1)
    return F.softmax(out.sa_logits.float(), dim=-1) + F.softmax(out.glca_logits.float(), dim=-1)
