"""export.py (issue 19): ONNX / TorchScript / torch.export artefacts of a tiny FGVC checkpoint
(whose GLCA reads the selected patches, so rollout and top-R are in the graph) and the ONNX
embedding of a tiny Re-ID one agree with load_trained's model in PyTorch at batch sizes 1 and 3;
the sidecar states what is true of them; the parity check fails on a graph that normalises twice.

References are independent of the export code: each format's own loader (onnxruntime,
torch.jit.load, torch.export.load), the model run by ``class_probabilities`` / ``embeddings``
on inputs normalised here with timm's constants, ``predict.py``'s pipeline on a PNG, hashlib."""

from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import run
from PIL import Image
from test_reid_train import reid_overrides, write_market
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

import export
from dual_cross_attention.builders import build_eval_pipeline
from dual_cross_attention.config import load_config
from dual_cross_attention.evaluation.reid import embeddings
from dual_cross_attention.exporting import (
    TOLERANCE,
    InferenceGraph,
    ParityError,
    check_parity,
    example_images,
    export_checkpoint,
    load_artifact,
    parity_images,
    reference_outputs,
    save_artifact,
)
from dual_cross_attention.exporting import graph as export_graph
from dual_cross_attention.exporting.sidecar import preprocessing
from dual_cross_attention.inference import class_probabilities
from dual_cross_attention.prediction import load_trained, predict_files
from dual_cross_attention.trainer import train

SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "exported": ".pt2"}


def own_loader(fmt: str, path):
    """The artefact run by its format's own runtime, not by the export code's ``load_artifact``."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    module = torch.jit.load(str(path)) if fmt == "torchscript" else torch.export.load(str(path)).module()
    return lambda x: module(x).detach()


def normalized(images: torch.Tensor, mean, std) -> torch.Tensor:
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def new_images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def fgvc_checkpoint(cub_root, tmp_path_factory):
    # cls+local: GLCA's readout reads the selected patches, so rollout and top-R are in the graph
    result = run(
        cub_root, tmp_path_factory.mktemp("fgvc_run"), "train.epochs=1", "model.glca_readout=cls+local"
    )
    return result.run_dir / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def fgvc_exports(fgvc_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("fgvc_export")
    return {fmt: export_checkpoint(fgvc_checkpoint, fmt, out / f"{fmt}{s}") for fmt, s in SUFFIX.items()}


@pytest.fixture(scope="module")
def reid_checkpoint(tmp_path_factory):
    root = write_market(tmp_path_factory.mktemp("reid_data") / "Market-1501")
    result = train(
        load_config(None, reid_overrides(root, tmp_path_factory.mktemp("reid_run"))), show_progress=False
    )
    return result.run_dir / "checkpoints" / "best.pt"


@pytest.mark.parametrize("fmt", list(SUFFIX))
def test_fgvc_artefact_matches_pytorch_at_batch_1_and_3(fmt, fgvc_exports, fgvc_checkpoint):
    result = fgvc_exports[fmt]
    trained = load_trained(fgvc_checkpoint, ["train.device=cpu"])
    artefact = own_loader(fmt, result.artifact)
    for batch, seed in ((1, 10), (3, 11)):
        images = new_images(batch, 32, 32, seed)
        probs, _ = class_probabilities(
            trained.model, normalized(images, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), ("sa+glca",)
        )
        got = artefact(images)
        assert got.shape == (batch, 3)
        torch.testing.assert_close(got, probs["sa+glca"] / 2, atol=TOLERANCE, rtol=0)
        assert torch.equal(got.argmax(1), probs["sa+glca"].argmax(1))
        torch.testing.assert_close(got.sum(1), torch.ones(batch))
    assert result.parity.passed and result.parity.max_abs_difference <= TOLERANCE
    assert result.parity.batch_sizes == (1, 3) and result.parity.top1_agree == 3


def test_fgvc_sidecar_states_what_is_true(fgvc_exports, fgvc_checkpoint):
    result = fgvc_exports["onnx"]
    assert result.sidecar == result.artifact.with_suffix(".json")
    side = json.loads(result.sidecar.read_text())
    state = torch.load(fgvc_checkpoint, map_location="cpu", weights_only=True)
    assert side["source"]["sha256"] == hashlib.sha256(fgvc_checkpoint.read_bytes()).hexdigest()
    assert side["artifact"]["sha256"] == hashlib.sha256(result.artifact.read_bytes()).hexdigest()
    assert side["artifact"] | {"file": "onnx.onnx", "format": "onnx"} == side["artifact"]
    assert side["task"] == "fgvc" and side["mode"] == "sa+glca"
    assert side["output"]["kind"] == "probabilities" and side["output"]["classes"] == list(state["classes"])
    assert side["output"]["shape"] == ["batch", 3] and side["output"]["sums_to"] == 1.0
    assert (
        side["input"] | {"shape": ["batch", 3, 32, 32], "channel_order": "RGB", "value_range": [0, 1]}
        == (side["input"])
    )
    norm = side["inside_graph"]["normalization"]
    assert norm["mean"] == list(IMAGENET_DEFAULT_MEAN) and norm["std"] == list(IMAGENET_DEFAULT_STD)
    assert (
        side["preprocessing"]["resize"] | {"height": 32, "width": 32, "keep_aspect_ratio": False}
        == (side["preprocessing"]["resize"])
    )
    assert side["preprocessing"]["center_crop"] == {"height": 32, "width": 32, "top": 0, "left": 0}
    assert side["inside_graph"]["rollout"]["path"] == "explicit"
    assert side["parity"]["passed"] and side["parity"]["max_abs_difference"] <= TOLERANCE
    assert (
        side["versions"]["torch"] == torch.__version__
        and side["versions"]["onnxruntime"] == onnxruntime.__version__
    )
    onnx_input = onnxruntime.InferenceSession(str(result.artifact)).get_inputs()[0]
    assert onnx_input.name == "images" and isinstance(onnx_input.shape[0], str)  # a symbolic batch
    # GLCA reads the selected patches (cls+local), so the top-R selection survives in the graph
    assert "TopK" in {node.op_type for node in onnx.load(str(result.artifact)).graph.node}


def test_sidecar_preprocessing_reproduces_predict_py(fgvc_exports, fgvc_checkpoint, tmp_path):
    """An image prepared as the sidecar says (here: already 32 x 32, so only /255) gives the
    probabilities predict.py reports for the same file."""
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "bird.png")
    trained = load_trained(fgvc_checkpoint, ["train.device=cpu"])
    [prediction], _ = predict_files(trained, [tmp_path / "bird.png"], top_k=3)
    images = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).float() / 255
    got = own_loader("onnx", fgvc_exports["onnx"].artifact)(images)[0]
    expected = [
        dict(zip(prediction.classes, prediction.probabilities, strict=True))[c] for c in trained.classes
    ]
    torch.testing.assert_close(got, torch.tensor(expected), atol=TOLERANCE, rtol=0)


def test_sidecar_resize_rule_is_the_eval_pipeline():
    """The resize and crop the sidecar states, done with cv2 as it says, then /255 and the
    graph's normalisation, give what evaluate.py feeds the model (here 40 px resized, 32 cropped)."""
    cfg = load_config(
        None, ["data.resize_size=40", "data.img_size=32", "model.backbone=deit_tiny_patch16_224"]
    )
    rule = preprocessing(cfg)
    size, crop = rule["resize"], rule["center_crop"]
    pixels = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    resized = cv2.resize(pixels, (size["width"], size["height"]), interpolation=cv2.INTER_LINEAR)
    cropped = resized[crop["top"] : crop["top"] + crop["height"], crop["left"] : crop["left"] + crop["width"]]
    images = torch.from_numpy(cropped).permute(2, 0, 1).unsqueeze(0).float() / 255
    expected = build_eval_pipeline(cfg)(pixels)
    got = normalized(images, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_reid_onnx_embedding_matches_pytorch_at_batch_1_and_3(reid_checkpoint, tmp_path):
    """The graph is the same module in every format (checked above on FGVC); ONNX is what Re-ID
    deployments use."""
    fmt = "onnx"
    result = export_checkpoint(reid_checkpoint, fmt, tmp_path / "reid.onnx")  # embedding by default
    trained = load_trained(reid_checkpoint, ["train.device=cpu"])
    artefact = own_loader(fmt, result.artifact)
    for batch, seed in ((1, 20), (3, 21)):
        images = new_images(batch, 32, 16, seed)
        with torch.no_grad():
            expected = embeddings(
                trained.model, trained.model(normalized(images, [0.5] * 3, [0.5] * 3)), ("sa+glca",)
            )
        got = artefact(images)
        assert got.shape == (batch, 96)  # [SA; GLCA], 48 each
        torch.testing.assert_close(got, expected["sa+glca"], atol=TOLERANCE, rtol=0)
        torch.testing.assert_close(got.view(batch, 2, 48).norm(dim=2), torch.ones(batch, 2))
    side = json.loads(result.sidecar.read_text())
    assert side["task"] == "reid" and side["output"] | {"kind": "embedding", "dim": 96} == side["output"]
    assert side["preprocessing"]["resize"]["height"] == 32 and side["preprocessing"]["resize"]["width"] == 16
    assert side["preprocessing"]["center_crop"] is None
    assert side["inside_graph"]["normalization"]["mean"] == [0.5, 0.5, 0.5]
    assert result.parity.top1_agree is None and result.parity.max_abs_difference <= TOLERANCE


class NormalisedTwice(nn.Module):
    """The known deployment failure: the input normalised before a graph that normalises too."""

    def __init__(self, graph: InferenceGraph) -> None:
        super().__init__()
        self.inner = graph  # not "graph": torch.export's GraphModule has an attribute of that name

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(self.inner.normalize(images))


def test_parity_check_fails_on_a_graph_that_normalises_twice(fgvc_checkpoint, tmp_path):
    trained = load_trained(fgvc_checkpoint, ["train.device=cpu"])
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    graph = InferenceGraph(trained.model, mean, std, "sa+glca", embedding=False)
    path = tmp_path / "twice.onnx"
    save_artifact(NormalisedTwice(graph), "onnx", path, example_images(32, 32), "probabilities")
    with pytest.raises(ParityError, match=r"max abs \S+ \(allowed 0\.0001\)") as caught:
        check_parity(
            lambda x: reference_outputs(trained.model, mean, std, "sa+glca", False, x),
            load_artifact("onnx", path),
            parity_images(32, 32),
            top1=True,
        )
    assert caught.value.report.max_abs_difference > TOLERANCE
    assert f"{caught.value.report.max_abs_difference:.3g}" in str(caught.value)


def test_export_py_fails_and_keeps_nothing_when_parity_fails(fgvc_checkpoint, tmp_path, monkeypatch, capsys):
    twice = export_graph.InferenceGraph.normalize
    monkeypatch.setattr(export_graph.InferenceGraph, "normalize", lambda self, x: twice(self, twice(self, x)))
    out = tmp_path / "model.pt"
    argv = ["--checkpoint", str(fgvc_checkpoint), "--format", "torchscript", "--out", str(out)]
    assert export.main(argv) == 1
    assert capsys.readouterr().err.startswith("error: parity check failed")
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_export_py_reports_the_parity_figure(fgvc_checkpoint, tmp_path, capsys):
    out = tmp_path / "sa.pt"
    argv = ["--checkpoint", str(fgvc_checkpoint), "--format", "torchscript", "--out", str(out)]
    assert export.main([*argv, "--mode", "sa", "--embedding"]) == 0
    assert "parity: max abs difference" in capsys.readouterr().out
    trained = load_trained(fgvc_checkpoint, ["train.device=cpu"])
    images = new_images(3, 32, 32, 30)
    with torch.no_grad():
        expected = trained.model(normalized(images, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)).sa_features
    torch.testing.assert_close(own_loader("torchscript", out)(images), expected, atol=TOLERANCE, rtol=0)
    assert json.loads(out.with_suffix(".json").read_text())["output"]["dim"] == 48


def test_export_py_refuses_a_sidecar_name_and_a_wrong_pt2_suffix(tmp_path, capsys):
    for fmt, name in (("onnx", "model.json"), ("exported", "model.onnx")):
        argv = ["--checkpoint", str(tmp_path / "none.pt"), "--format", fmt, "--out", str(tmp_path / name)]
        assert export.main(argv) == 1
        assert capsys.readouterr().err.startswith("error: --out")
