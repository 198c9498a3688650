"""Writing the inference graph in each format, and running what was written.

- ``onnx``: ``torch.onnx.export`` (the torch.export-based exporter, onnxscript), one file with
  the weights inside, run with onnxruntime (``pip install .[export]``).
- ``torchscript``: ``torch.jit.trace``, saved with ``torch.jit.save``, run with ``torch.jit.load``.
- ``exported``: ``torch.export.export`` with a dynamic batch dimension, ``torch.export.save``
  (``.pt2``), run with ``torch.export.load(...).module()``.

The batch dimension is dynamic in all three. A tracer that specialises it would pass a parity
check at the traced batch size only, so the example is traced at a batch size the parity check
does not use, and the ONNX input is checked for a symbolic batch dimension as well.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..errors import DcalError, SetupError

FORMATS = ("onnx", "torchscript", "exported")
INPUT_NAME = "images"
BATCH_DIM = "batch"

_logger = logging.getLogger(__name__)

Runner = Callable[[torch.Tensor], torch.Tensor]  # (B, 3, H, W) float32 -> (B, K) or (B, D)


class ExportError(DcalError, RuntimeError):
    """The exported artefact is not the model: a fixed batch size, or outputs that differ."""


def optional_module(name: str) -> ModuleType:
    """Import a package of the ``export`` extra, or say how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise SetupError(
            f"--format onnx needs {name}, which is not installed: pip install '.[export]' "
            "(onnx, onnxruntime, onnxscript)"
        ) from err


@contextlib.contextmanager
def torch_jit_quietly() -> Iterator[None]:
    """Without torch.jit's deprecation warnings, one per call: ``save_artifact`` says it once."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=FutureWarning)
        yield


def save_artifact(
    graph: nn.Module, fmt: str, path: Path, example: torch.Tensor, output_name: str
) -> dict[str, Any]:
    """Export ``graph`` (in eval mode) traced on ``example`` (B, 3, H, W) to ``path``; returns
    what the sidecar records of the format (opset, input and output names)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    graph.eval()
    with torch.no_grad():
        if fmt == "onnx":
            return _save_onnx(graph, path, example, output_name)
        if fmt == "torchscript":
            _logger.info(
                "torch.jit is deprecated in torch %s; --format exported is its successor", torch.__version__
            )
            with torch_jit_quietly():
                torch.jit.save(torch.jit.trace(graph, example, check_trace=False), str(path))
            return {"saved_with": "torch.jit.trace + torch.jit.save", "load_with": "torch.jit.load"}
        batch = torch.export.Dim(BATCH_DIM, min=1)
        program = torch.export.export(graph, (example,), dynamic_shapes={INPUT_NAME: {0: batch}})
        torch.export.save(program, str(path))
        return {
            "saved_with": "torch.export.export + torch.export.save",
            "load_with": "torch.export.load(path).module()",
        }


def _save_onnx(graph: nn.Module, path: Path, example: torch.Tensor, output_name: str) -> dict[str, Any]:
    optional_module("onnxscript")
    onnx = optional_module("onnx")
    program = torch.onnx.export(
        graph, (example,), input_names=[INPUT_NAME], output_names=[output_name],
        dynamic_shapes={INPUT_NAME: {0: torch.export.Dim(BATCH_DIM, min=1)}},
        dynamo=True, external_data=False, verbose=False,
    )  # fmt: skip
    program.save(str(path), external_data=False)
    proto = onnx.load(str(path))
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if not batch.dim_param:
        raise ExportError(
            f"the ONNX exporter fixed the batch size of {path} to {batch.dim_value}; the model has a "
            "computation that depends on the batch size. Try --format exported, or report this as a bug."
        )
    opset = next(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx"))
    return {
        "saved_with": "torch.onnx.export(dynamo=True)",
        "load_with": "onnxruntime.InferenceSession",
        "opset": opset,
    }


def load_artifact(fmt: str, path: Path) -> Runner:
    """A function that runs the artefact at ``path`` on a CPU: (B, 3, H, W) in, (B, ...) out."""
    if fmt == "onnx":
        ort = optional_module("onnxruntime")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run_onnx(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {INPUT_NAME: images.numpy()})[0])

        return run_onnx
    if fmt == "torchscript":
        with torch_jit_quietly():
            module = torch.jit.load(str(path), map_location="cpu")
    elif fmt == "exported":
        module = torch.export.load(str(path)).module()
    else:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")

    def run_torch(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return module(images)

    return run_torch
