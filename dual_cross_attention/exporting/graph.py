"""The module that is exported: normalisation, the DCAL model in inference mode, and the output
of one mode (class probabilities or the retrieval embedding), on a path that traces.

``DualViT.forward`` picks its rollout path at run time: where ``fused_lse`` finds a log-sum-exp
kernel (PyTorch's private SDPA ops) attention is fused and the rollout is summed over tiles
whose count depends on the batch size; elsewhere attention is explicit and rollout multiplies
the N x N maps. The fused path neither exports to ONNX nor keeps the batch dynamic, so the
graph is always built on the explicit path (``explicit_outputs``), whatever this machine's
kernels; the parity check compares it with ``DualViT.forward`` as PyTorch runs it here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from ..evaluation.reid import embeddings
from ..inference import as_distribution, class_probabilities
from ..models.backbone import embed, head_outputs
from ..models.blocks import sa_block_with_map
from ..models.dual_vit import DualViT, DualViTOutput, combine_probabilities
from ..models.fused_lse import lse_available
from ..models.rollout import rollout_cls_row

GRAPH_ROLLOUT_PATH = "explicit"  # what explicit_outputs computes


def explicit_outputs(model: DualViT, images: torch.Tensor) -> DualViTOutput:
    """``DualViT.forward`` in eval mode on its explicit path: every block's attention with the
    softmax materialised, rollout from the head-averaged maps, top-R selection by ``topk``.
    Nothing depends on the values or the batch size, so it traces with a dynamic batch.

    Args:
        model: in eval mode (no PWCA, no dropout).
        images: (B, 3, H, W) normalised.
    """
    bb = model.backbone
    x = embed(bb, images)  # (B, N, C)
    maps = []  # per block: head-averaged attention (B, N, N)
    last_input = x
    for block in bb.blocks:
        last_input = x
        x, _, _, head_mean = sa_block_with_map(block, x)
        maps.append(head_mean)
    sa_features, sa_logits = head_outputs(bb, bb.norm(x))
    out = DualViTOutput(sa_logits=sa_logits, sa_features=sa_features)
    if model.use_glca:
        last_cls_row = maps[-1][:, 0]  # (B, N)
        out.rollout = rollout_cls_row(last_cls_row, reversed(maps[:-1]))[:, model.num_prefix_tokens :]
        out.local_index = model._select_local(out.rollout, last_cls_row)
        out.glca_features, out.glca_logits = model._glca(last_input, out.local_index)
    return out


def reference_rollout_path(model: DualViT, images: torch.Tensor) -> str:
    """The rollout path ``DualViT.forward`` takes for ``images`` without autograd: ``fused`` where a
    log-sum-exp kernel exists for them, else ``explicit`` (``none`` without GLCA)."""
    if not model.use_glca:
        return "none"
    return "fused" if lse_available(images, model.backbone.blocks[0].attn.head_dim) else "explicit"


def outputs_of(model: DualViT, out: DualViTOutput, mode: str, embedding: bool) -> torch.Tensor:
    """What the exported graph returns: the retrieval embedding (B, D) of ``mode`` (as evaluation
    ranks it), or its class probabilities (B, K) summing to one (as predict.py reports them)."""
    if embedding:
        return embeddings(model, out, (mode,))[mode]
    return as_distribution(combine_probabilities(out, mode), mode)


class InferenceGraph(nn.Module):
    """Float RGB in [0, 1] (B, 3, H, W) -> probabilities (B, K) or embedding (B, D) of one mode,
    with the input normalisation inside."""

    def __init__(
        self, model: DualViT, mean: Sequence[float], std: Sequence[float], mode: str, embedding: bool
    ) -> None:
        """Args:
        model: a trained DualViT; it is put in eval mode.
        mean, std: the per-channel normalisation the model was trained with (0-1 scale).
        mode: ``sa``, ``glca`` or ``sa+glca``.
        embedding: return the retrieval embedding instead of class probabilities.
        """
        super().__init__()
        self.model = model.eval()
        self.mode = mode
        self.embedding = embedding
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = explicit_outputs(self.model, self.normalize(images))
        return outputs_of(self.model, out, self.mode, self.embedding)


@torch.no_grad()
def reference_outputs(
    model: DualViT,
    mean: Sequence[float],
    std: Sequence[float],
    mode: str,
    embedding: bool,
    images: torch.Tensor,
) -> torch.Tensor:
    """The same outputs from PyTorch as evaluate.py and predict.py compute them: torchvision's
    normalisation, outside any exported module, then ``DualViT.forward`` on whichever rollout
    path it picks here, in float32."""
    normalized = TF.normalize(images.float(), list(mean), list(std))
    if embedding:
        return embeddings(model, model(normalized), (mode,))[mode]
    probs, _ = class_probabilities(model, normalized, (mode,))
    return as_distribution(probs[mode], mode)
