"""Export a trained model for deployment (ONNX, TorchScript, torch.export) with the input
normalisation inside, a parity check against PyTorch at every export, and a sidecar that says
how to feed the model and read its output."""

from .checkpoint_export import ExportResult, export_checkpoint, sidecar_path
from .formats import FORMATS, ExportError, load_artifact, save_artifact
from .graph import InferenceGraph, explicit_outputs, reference_outputs
from .parity import TOLERANCE, ParityError, ParityReport, check_parity, example_images, parity_images
from .sidecar import SCHEMA, describe, sha256

__all__ = [
    "FORMATS",
    "SCHEMA",
    "TOLERANCE",
    "ExportError",
    "ExportResult",
    "InferenceGraph",
    "ParityError",
    "ParityReport",
    "check_parity",
    "describe",
    "example_images",
    "explicit_outputs",
    "export_checkpoint",
    "load_artifact",
    "parity_images",
    "reference_outputs",
    "save_artifact",
    "sha256",
    "sidecar_path",
]
