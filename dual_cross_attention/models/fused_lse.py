"""Fused attention that also returns each query's log-sum-exp: the one place that calls PyTorch's
private SDPA kernels.

Rollout needs the attention maps A = softmax(S), S = q k^T * scale, only through
(r A)_j = sum_i r_i exp(S_ij - lse_i) with lse_i = log sum_j exp(S_ij). The kernels behind
``F.scaled_dot_product_attention`` compute lse for their backward and return it, so the
forward can keep it (B x nh x N per block) instead of an N x N map. In torch 2.14:

- CPU: ``aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout_p, is_causal, *,
  attn_mask, scale) -> (output, logsumexp)``; lse (B, nh, Nq) float32 for float32 and bf16/fp16
  inputs; dropout_p > 0 is refused (SDPA then picks the math backend). Differentiable: its
  backward is ``_scaled_dot_product_flash_attention_for_cpu_backward``, what SDPA runs.
- CUDA: ``aten._scaled_dot_product_flash_attention`` (fp16/bf16; output, logsumexp, ...) and
  ``aten._scaled_dot_product_efficient_attention(..., compute_log_sumexp=True)`` (lse may be
  padded past Nq).

lse is the natural log and includes the scale: lse_i = logsumexp_j(scale * q_i . k_j) of the
undropped scores (dropout acts on the normalised weights). Which kernel runs is PyTorch's own
choice for the inputs (``torch._fused_sdp_choice``, what SDPA calls), so ``sdpa_kernel``
contexts are honoured: under the math backend (FLOP counting, or dropout on CPU) the attention is
computed as the math backend does it, softmax materialised, and lse read off its scores, at
SDPA's math FLOPs. ``lse_kernels`` checks each kernel once per device, dtype and head size on a
tiny input against an explicit reference; where none works the model uses its explicit path.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend

log = logging.getLogger(__name__)

FLASH = int(SDPBackend.FLASH_ATTENTION.value)
EFFICIENT = int(SDPBackend.EFFICIENT_ATTENTION.value)
MATH = int(SDPBackend.MATH.value)

# (device type, SDPA backend) -> the private op that returns lse with the output.
KERNEL_NAMES = {
    ("cpu", FLASH): "_scaled_dot_product_flash_attention_for_cpu",
    ("cuda", FLASH): "_scaled_dot_product_flash_attention",
    ("cuda", EFFICIENT): "_scaled_dot_product_efficient_attention",
}
PROBE_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}  # bf16, fp16: 3e-2


def _run_kernel(
    backend: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    op = getattr(torch.ops.aten, KERNEL_NAMES[(q.device.type, backend)])
    if backend == EFFICIENT:
        out, lse = op(q, k, v, None, True, dropout_p, False, scale=scale)[:2]
        return out, lse[..., : q.shape[-2]]  # padded to a multiple of the kernel's block size
    return op(q, k, v, dropout_p, False, scale=scale)[:2]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention runs in for activations ``x``: autocast's where it is on."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


@functools.cache
def lse_kernels(device: torch.device, dtype: torch.dtype, head_dim: int) -> frozenset[int]:
    """The SDPA backends whose lse kernel works on ``device`` in ``dtype`` for ``head_dim``: each
    known kernel is run once on a tiny input and compared with an explicit softmax. Logs once
    which rollout path that gives. Cached; empty where no kernel exists or works."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        working, failures = _probe(device, dtype, head_dim)
    where = f"{device}, {str(dtype).removeprefix('torch.')}, head_dim {head_dim}"
    if working:
        names = ", ".join(KERNEL_NAMES[(device.type, b)] for b in sorted(working))
        log.info("attention rollout (%s): fused path, log-sum-exp from %s; no N x N maps", where, names)
    else:
        why = "; ".join(failures) or f"no log-sum-exp kernel known for {device.type}"
        log.info("attention rollout (%s): explicit path, N x N maps in inference (%s)", where, why)
    return frozenset(working)


def _probe(device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[set[int], list[str]]:
    """Run each kernel known for ``device`` on a tiny input; returns the backends that agree with
    an explicit softmax, and why the others were refused."""
    generator = torch.Generator().manual_seed(0)  # not the global one: the probe draws nothing from it
    q, k, v = torch.randn(3, 1, 2, 9, head_dim, generator=generator).to(device, dtype).unbind(0)
    scale = head_dim**-0.5
    # Elementwise in float64: no matmul, so a FLOP counter around a first forward sees no probe.
    scores = (q.double().unsqueeze(-2) * k.double().unsqueeze(-3)).sum(-1) * scale  # (1, 2, 9, 9)
    ref_out = (scores.softmax(-1).unsqueeze(-1) * v.double().unsqueeze(-3)).sum(-2)
    ref_lse = scores.logsumexp(-1)
    tol = PROBE_TOLERANCE.get(dtype, 3e-2)
    working, failures = set(), []
    for (device_type, backend), name in KERNEL_NAMES.items():
        if device_type != device.type:
            continue
        if getattr(torch.ops.aten, name, None) is None:
            failures.append(f"{name}: not in this torch")
            continue
        try:
            out, lse = _run_kernel(backend, q, k, v, scale, 0.0)
        except (RuntimeError, NotImplementedError) as err:  # the kernel refuses this device/dtype
            failures.append(f"{name}: {str(err).splitlines()[0]}")
            continue
        close_out = torch.allclose(out.double(), ref_out, atol=tol, rtol=tol)
        if close_out and torch.allclose(lse.double(), ref_lse, atol=tol, rtol=tol):
            working.add(backend)
        else:
            failures.append(f"{name}: output or log-sum-exp differ from explicit attention")
    return working, failures


def lse_available(x: torch.Tensor, head_dim: int) -> bool:
    """Whether ``attention_with_lse`` has a kernel for activations ``x`` (device, autocast dtype)."""
    return bool(lse_kernels(x.device, compute_dtype(x), head_dim))


def math_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's math backend with lse read off the scores: same matmuls, so the same FLOPs."""
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, nh, Nq, Nk)
    lse = scores.detach().float().logsumexp(dim=-1)
    weights = scores.softmax(dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return weights @ v, lse


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, dropout_p: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v, differentiable, and each query's log-sum-exp, without autograd.

    Args:
        q: (B, nh, Nq, hd). k, v: (B, nh, Nk, hd). dropout_p: on the attention weights only.

    Returns:
        out (B, nh, Nq, hd) as ``F.scaled_dot_product_attention`` gives it, and lse (B, nh, Nq)
        float32: logsumexp_j(scale * q_i . k_j) of the undropped scores.
    """
    if torch.is_autocast_enabled(q.device.type):
        # Autocast runs SDPA in its low precision; the private kernels are not on its op list.
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    backend = torch._fused_sdp_choice(q, k, v, None, dropout_p, False, scale=scale)
    if backend in lse_kernels(q.device, q.dtype, q.shape[-1]):
        out, lse = _run_kernel(backend, q, k, v, scale, dropout_p)
        return out, lse.detach()
    if backend == MATH:
        return math_attention_with_lse(q, k, v, scale, dropout_p)
    # A fused backend without an lse kernel here (cuDNN, say): its output, lse in tiles.
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    return out, logsumexp_rows(q, k, scale)


# Score elements per tile of the row-by-row products (rollout.py, logsumexp_rows), a bound on
# their scratch memory whatever the batch. CPU: 2 MiB, so that a tile is still in cache when exp
# and the row-vector product read it again (see rollout.TILE_ROWS for the measurement).
TILE_ELEMENTS = {"cpu": 2**19, "cuda": 2**24}


def tile_elements(device: torch.device) -> int:
    return TILE_ELEMENTS.get(device.type, TILE_ELEMENTS["cpu"])


@torch.no_grad()
def logsumexp_rows(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, nh, Nq) logsumexp_j(scale * q_i . k_j) in float32, some query rows at a time."""
    B, nh, Nq, hd = q.shape
    with torch.autocast(q.device.type, enabled=False):
        qf = q.float().reshape(B * nh, Nq, hd) * scale
        kt = k.float().reshape(B * nh, -1, hd).transpose(1, 2)  # (B nh, hd, Nk)
        rows = max(1, tile_elements(q.device) // (B * nh * kt.shape[-1]))
        parts = [torch.bmm(qf[:, i : i + rows], kt).logsumexp(dim=-1) for i in range(0, Nq, rows)]
        return torch.cat(parts, dim=1).view(B, nh, Nq)
