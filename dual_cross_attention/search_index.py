"""Search your own images: a gallery folder embedded once into an index file, then ranked by
cosine similarity for each query image (``search.py``).

The vectors are the retrieval embeddings of ``evaluation.reid.embeddings``: for a Re-ID
checkpoint the BNNeck-normed features it is evaluated with, for an FGVC checkpoint the pre-logit
class-token features ("find similar"). Images go through the checkpoint's eval transform, as in
``predict.py``, and an unreadable file is reported and skipped. Every mode the model has is
stored, so ``--mode`` can change without embedding anything again.

The index (``DIR/.dcal_index.npz`` unless given) is a plain ``np.savez`` archive, read with
``allow_pickle=False``. N embedded files, U unreadable ones, M modes:

    format                        ()      int64, INDEX_FORMAT
    paths                         (N,)    str, files relative to the gallery folder (POSIX), sorted
    mtime_ns, size                (N,)    int64, each file's modification time and size when embedded
    modes                         (M,)    str, e.g. sa, glca, sa+glca
    features_<mode>               (N, D)  float32, row i is paths[i]; one array per mode
    unreadable_paths              (U,)    str, files that could not be decoded, not tried again
    unreadable_mtime_ns           (U,)    int64   until their mtime or size changes
    unreadable_size               (U,)    int64
    unreadable_reason             (U,)    str
    checkpoint_sha256             ()      str, of the checkpoint file the features came from
    checkpoint_path, checkpoint_mtime_ns, checkpoint_size: the file that hash was computed for
    transform                     ()      str, the input transform in words
    task                          ()      str, fgvc or reid
    gallery                       ()      str, the gallery folder (absolute) when written

A later call embeds only new files and files whose mtime or size changed, drops the entries of
deleted files, and starts over when the checkpoint's hash, the transform or the modes differ.
The hash is taken again only when the checkpoint's path, mtime or size differ from those stored,
so a large checkpoint is read once. As with any mtime + size check, a file rewritten with the
same size within the file system's timestamp resolution looks unchanged. The index file is
replaced atomically (temporary file + rename): an interrupted call leaves the previous one intact.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from tqdm import tqdm

from .builders import build_eval_pipeline, normalization
from .config import Config, image_hw
from .data import CorruptImageError, ImagePipeline, load_rgb
from .data.reid_transforms import build_reid_eval_transform
from .errors import DcalError, UsageError
from .evaluation.reid import embeddings
from .inference import check_mode
from .prediction import Skipped, TrainedModel, _batches, _decode, find_images
from .retrieval.ranking import pairwise_distance
from .runtime import autocast
from .visualize import DPI, _new_figure, _save

_logger = logging.getLogger(__name__)

INDEX_NAME = ".dcal_index.npz"
INDEX_FORMAT = 1
_HASH_BLOCK = 1 << 22  # bytes read at a time when hashing a checkpoint


class SearchIndexError(DcalError, ValueError):
    """An index file that cannot be read or is not one this module wrote."""


@dataclass(frozen=True)
class Stamp:
    """What tells two versions of a file apart without reading it."""

    mtime_ns: int
    size: int

    @classmethod
    def of(cls, path: Path) -> Stamp:
        status = path.stat()
        return cls(status.st_mtime_ns, status.st_size)


@dataclass
class GalleryIndex:
    """The embedded gallery: the index file's contents (see the module docstring)."""

    paths: list[str]  # relative to the gallery folder, POSIX, sorted
    stamps: list[Stamp]  # of paths[i] when it was embedded
    features: dict[str, np.ndarray]  # mode -> (N, D) float32, row i = paths[i]
    unreadable: dict[str, tuple[Stamp, str]]  # relative path -> (its stamp, why it cannot be decoded)
    checkpoint_sha256: str
    checkpoint_file: tuple[str, Stamp]  # (resolved path, stamp) of the file the hash was taken of
    transform: str
    task: str

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class IndexReport:
    """What ``update_index`` did."""

    path: Path  # the index file
    images: int  # gallery images in the index
    reused: int  # of them, taken from the previous index
    embedded: int  # of them, embedded by this call
    removed: int  # entries dropped because their files left the gallery
    skipped: list[Skipped]  # gallery files that could not be used, with the reason
    rebuilt: str | None  # why the index was started from scratch; None: a previous one was updated
    written: bool  # False when nothing changed, so the file was left as it was

    def summary(self) -> str:
        counts = (
            f"{self.images} images ({self.reused} reused, {self.embedded} embedded, {self.removed} removed)"
        )
        start = f"; built from scratch: {self.rebuilt}" if self.rebuilt else ""
        return f"index {self.path}: {counts}{start}"


@dataclass(frozen=True)
class Match:
    rank: int  # 1 = most similar
    path: Path  # the gallery file
    similarity: float  # cosine similarity of the two embeddings, in [-1, 1]


@dataclass(frozen=True)
class SearchResult:
    """A query image and its most similar gallery images, most similar first."""

    query: Path
    matches: list[Match]


def search_transform(cfg: Config) -> tuple[ImagePipeline, str]:
    """The checkpoint's eval transform and its description in words (stored in the index)."""
    mean, std = normalization(cfg)
    norm = f"normalize mean {list(mean)} std {list(std)}; RGB, CHW float32"
    if cfg.task == "reid":
        height, width = image_hw(cfg.data.img_size)
        resize = f"reid eval: resize to {height}x{width} (HxW, bilinear)"
        return build_reid_eval_transform((height, width), mean, std), f"{resize}; {norm}"
    size, resize = cfg.data.img_size, cfg.data.resize_size
    crop = f"fgvc eval: resize to {resize}x{resize} (bilinear), center-crop {size}x{size}"
    return build_eval_pipeline(cfg), f"{crop}; {norm}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_hash(path: Path, previous: GalleryIndex | None) -> tuple[str, tuple[str, Stamp]]:
    """The checkpoint's sha256 and the (resolved path, stamp) it belongs to; the previous index's
    hash is reused when that file has not changed since."""
    identity = (str(path.resolve()), Stamp.of(path))
    if previous is not None and previous.checkpoint_file == identity:
        return previous.checkpoint_sha256, identity
    return file_sha256(path), identity


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.asarray(list(values), dtype=np.str_)


def _int64(values: Sequence[int]) -> np.ndarray:
    return np.asarray(list(values), dtype=np.int64)


def save_index(index: GalleryIndex, path: Path, gallery: Path) -> Path:
    """Write ``index`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    unreadable = list(index.unreadable.items())
    arrays = {
        "format": np.asarray(INDEX_FORMAT, dtype=np.int64),
        "paths": _strings(index.paths),
        "mtime_ns": _int64([s.mtime_ns for s in index.stamps]),
        "size": _int64([s.size for s in index.stamps]),
        "modes": _strings(list(index.features)),
        **{f"features_{mode}": f.astype(np.float32, copy=False) for mode, f in index.features.items()},
        "unreadable_paths": _strings([rel for rel, _ in unreadable]),
        "unreadable_mtime_ns": _int64([stamp.mtime_ns for _, (stamp, _) in unreadable]),
        "unreadable_size": _int64([stamp.size for _, (stamp, _) in unreadable]),
        "unreadable_reason": _strings([reason for _, (_, reason) in unreadable]),
        "checkpoint_sha256": np.asarray(index.checkpoint_sha256),
        "checkpoint_path": np.asarray(index.checkpoint_file[0]),
        "checkpoint_mtime_ns": np.asarray(index.checkpoint_file[1].mtime_ns, dtype=np.int64),
        "checkpoint_size": np.asarray(index.checkpoint_file[1].size, dtype=np.int64),
        "transform": np.asarray(index.transform),
        "task": np.asarray(index.task),
        "gallery": np.asarray(str(gallery.resolve())),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return path


_REQUIRED = (
    "format", "paths", "mtime_ns", "size", "modes", "unreadable_paths", "unreadable_mtime_ns",
    "unreadable_size", "unreadable_reason", "checkpoint_sha256", "checkpoint_path",
    "checkpoint_mtime_ns", "checkpoint_size", "transform", "task",
)  # fmt: skip


def load_index(path: Path) -> GalleryIndex:
    """Read an index file written by ``save_index`` (no pickles); SearchIndexError if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise SearchIndexError(f"{path} is not a readable index file: {err}") from err
    missing = [key for key in _REQUIRED if key not in arrays]
    if missing:
        raise SearchIndexError(f"{path} lacks {missing}: not an index this version wrote")
    if int(arrays["format"]) != INDEX_FORMAT:
        raise SearchIndexError(
            f"{path} has index format {int(arrays['format'])}, this code reads {INDEX_FORMAT}"
        )
    modes = [str(m) for m in arrays["modes"]]
    features = {mode: arrays.get(f"features_{mode}") for mode in modes}
    count = len(arrays["paths"])
    shapes_ok = len(arrays["mtime_ns"]) == len(arrays["size"]) == count and all(
        f is not None and f.ndim == 2 and len(f) == count for f in features.values()
    )
    if not shapes_ok:
        raise SearchIndexError(f"{path}: the paths, stamps and features do not line up")
    unreadable = {
        str(rel): (Stamp(int(mtime), int(size)), str(reason))
        for rel, mtime, size, reason in zip(
            arrays["unreadable_paths"], arrays["unreadable_mtime_ns"], arrays["unreadable_size"],
            arrays["unreadable_reason"], strict=True,
        )
    }  # fmt: skip
    return GalleryIndex(
        paths=[str(p) for p in arrays["paths"]],
        stamps=[Stamp(int(m), int(s)) for m, s in zip(arrays["mtime_ns"], arrays["size"], strict=True)],
        features=features,
        unreadable=unreadable,
        checkpoint_sha256=str(arrays["checkpoint_sha256"]),
        checkpoint_file=(
            str(arrays["checkpoint_path"]),
            Stamp(int(arrays["checkpoint_mtime_ns"]), int(arrays["checkpoint_size"])),
        ),
        transform=str(arrays["transform"]),
        task=str(arrays["task"]),
    )


@torch.no_grad()
def embed_files(
    trained: TrainedModel,
    paths: Sequence[Path],
    transform: ImagePipeline,
    batch_size: int = 32,
    show_progress: bool = False,
) -> tuple[dict[str, np.ndarray], list[Path], list[Skipped]]:
    """The retrieval embedding (n, D) float32 of every mode for the readable files among ``paths``,
    those files in order, and the unreadable ones with the reason."""
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    modes = trained.modes
    chunks: dict[str, list[np.ndarray]] = {mode: [] for mode in modes}
    kept: list[Path] = []
    skipped: list[Skipped] = []
    batches = _batches(paths, batch_size)
    total = -(-len(paths) // batch_size)
    for chunk in tqdm(batches, total=total, desc="embed", disable=not (show_progress and paths), leave=False):
        tensors, readable, bad = _decode(chunk, transform)
        skipped += bad
        if not readable:
            continue
        images = torch.stack(tensors).to(trained.device)  # (B, 3, H, W)
        with autocast(trained.device, trained.amp_dtype):
            out = trained.model(images)
        for mode, value in embeddings(trained.model, out, modes).items():  # (B, D) float32
            chunks[mode].append(value.cpu().numpy())
        kept += readable
    features = {m: np.concatenate(c) if c else np.zeros((0, 0), np.float32) for m, c in chunks.items()}
    return features, kept, skipped


def _scan(gallery: Path) -> tuple[dict[str, Stamp], list[Skipped]]:
    """Every image under ``gallery`` (relative path -> stamp, sorted), and what could not be used."""
    paths, skipped = find_images([gallery])
    found: dict[str, Stamp] = {}
    for path in paths:
        try:
            found[path.relative_to(gallery).as_posix()] = Stamp.of(path)
        except OSError as err:  # gone or unreadable since the folder was listed
            skipped.append(Skipped(path, str(err)))
    return found, skipped


def _previous(
    path: Path, trained: TrainedModel, transform: str
) -> tuple[GalleryIndex | None, str | None, str, tuple[str, Stamp]]:
    """The index at ``path`` when its features are valid for this checkpoint and transform, else
    None and why not; and the checkpoint's hash with the file it was taken of."""
    old, why = None, "no index yet"
    if path.exists():
        try:
            old = load_index(path)
        except SearchIndexError as err:
            why = f"the previous index could not be read ({err})"
    sha, identity = checkpoint_hash(trained.checkpoint, old)
    if old is not None:
        if old.checkpoint_sha256 != sha:
            why = f"the checkpoint changed (sha256 {old.checkpoint_sha256[:12]} -> {sha[:12]})"
        elif old.transform != transform:
            why = f"the input transform changed ({old.transform!r} -> {transform!r})"
        elif list(old.features) != list(trained.modes):
            why = f"the modes changed ({list(old.features)} -> {list(trained.modes)})"
        else:
            return old, None, sha, identity
    if path.exists():
        _logger.warning("%s: the index %s is rebuilt from scratch", why, path)
    return None, why, sha, identity


def _plan(
    current: dict[str, Stamp], old: GalleryIndex | None
) -> tuple[dict[str, int], dict[str, tuple[Stamp, str]], list[str], int]:
    """What the previous index still holds for the gallery as it is now: the rows of unchanged
    files (relative path -> row), the unchanged unreadable files, the files to embed, and the
    number of entries whose files are gone."""
    if old is None:
        return {}, {}, list(current), 0
    rows = {rel: (row, stamp) for row, (rel, stamp) in enumerate(zip(old.paths, old.stamps, strict=True))}
    reused = {rel: rows[rel][0] for rel, stamp in current.items() if rel in rows and rows[rel][1] == stamp}
    still_bad = {
        rel: old.unreadable[rel]
        for rel, stamp in current.items()
        if rel in old.unreadable and old.unreadable[rel][0] == stamp
    }
    todo = [rel for rel in current if rel not in reused and rel not in still_bad]
    gone = len((set(old.paths) | set(old.unreadable)) - set(current))
    return reused, still_bad, todo, gone


def _merge(
    old: GalleryIndex | None, reused: dict[str, int], new: dict[str, np.ndarray], new_paths: list[str]
) -> tuple[list[str], dict[str, np.ndarray]]:
    """The reused rows of ``old`` and the ``new`` ones (mode -> (n, D)) together, sorted by path."""
    paths = list(reused) + new_paths
    order = np.argsort(np.asarray(paths, dtype=np.str_), kind="stable")
    features = {}
    for mode, rows in new.items():
        parts = [old.features[mode][list(reused.values())]] if reused else []
        parts += [rows] if new_paths else []
        merged = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        features[mode] = merged[order]
    return [paths[i] for i in order], features


def update_index(
    trained: TrainedModel,
    gallery: str | Path,
    index_path: str | Path | None = None,
    batch_size: int = 32,
    show_progress: bool = False,
) -> tuple[GalleryIndex, IndexReport]:
    """Bring the index of ``gallery`` up to date for ``trained`` and return it.

    Args:
        trained: from ``prediction.load_trained``.
        gallery: a folder; its .jpg/.jpeg/.png/.webp files are found recursively.
        index_path: the index file; default ``gallery/.dcal_index.npz``.
        batch_size: images per forward pass.
        show_progress: a progress bar over the images being embedded.
    """
    gallery = Path(gallery)
    if not gallery.is_dir():
        raise UsageError(f"the gallery {gallery} is not a folder")
    path = Path(index_path) if index_path is not None else gallery / INDEX_NAME
    transform, described = search_transform(trained.config)
    old, rebuilt, sha, checkpoint_file = _previous(path, trained, described)
    current, skipped = _scan(gallery)
    reused, unreadable, todo, gone = _plan(current, old)
    if todo:
        _logger.info("embedding %d new or changed images of %s", len(todo), gallery)
    new, kept, bad = embed_files(
        trained, [gallery / rel for rel in todo], transform, batch_size, show_progress
    )
    for item in bad:
        rel = item.path.relative_to(gallery).as_posix()
        unreadable[rel] = (current[rel], item.reason)
    unreadable = dict(sorted(unreadable.items()))
    paths, features = _merge(old, reused, new, [p.relative_to(gallery).as_posix() for p in kept])
    index = GalleryIndex(
        paths=paths,
        stamps=[current[rel] for rel in paths],
        features=features,
        unreadable=unreadable,
        checkpoint_sha256=sha,
        checkpoint_file=checkpoint_file,
        transform=described,
        task=trained.config.task,
    )
    written = old is None or bool(todo) or gone > 0 or checkpoint_file != old.checkpoint_file
    if written:
        try:
            save_index(index, path, gallery)
        except OSError as err:
            raise UsageError(f"cannot write the index {path}: {err}; give --index a writable path") from err
    skipped += [Skipped(gallery / rel, reason) for rel, (_, reason) in unreadable.items()]
    report = IndexReport(path, len(paths), len(reused), len(kept), gone, skipped, rebuilt, written)
    _logger.info("%s", report.summary())
    return index, report


def search_files(
    trained: TrainedModel,
    index: GalleryIndex,
    gallery: str | Path,
    queries: Sequence[Path],
    mode: str = "sa+glca",
    top: int = 10,
    batch_size: int = 32,
) -> tuple[list[SearchResult], list[Skipped]]:
    """The ``top`` gallery images most similar (cosine) to each readable query, most similar
    first with ties in path order; unreadable queries are skipped and returned.

    A query that is itself in the gallery finds itself first, with similarity 1.
    """
    check_mode(mode, trained.modes)
    if top < 1:
        raise UsageError(f"top must be >= 1, got {top}")
    transform, _ = search_transform(trained.config)
    features, kept, skipped = embed_files(trained, queries, transform, batch_size)
    if not kept or not len(index):
        return [], skipped
    query = torch.from_numpy(features[mode])  # (Q, D)
    distance = pairwise_distance(query, torch.from_numpy(index.features[mode]), "cosine")  # (Q, G)
    nearest = torch.sort(distance, dim=1, stable=True).indices[:, :top]  # (Q, k)
    similarity = (1 - distance).gather(1, nearest)  # (Q, k)
    results = []
    for path, rows, values in zip(kept, nearest.tolist(), similarity.tolist(), strict=True):
        matches = [
            Match(rank, Path(gallery) / index.paths[row], value)
            for rank, (row, value) in enumerate(zip(rows, values, strict=True), start=1)
        ]
        results.append(SearchResult(path, matches))
    return results, skipped


def results_frame(results: Sequence[SearchResult]) -> pd.DataFrame:
    """One row per match: query, rank, path, similarity."""
    rows = [
        {"query": str(r.query), "rank": m.rank, "path": str(m.path), "similarity": m.similarity}
        for r in results
        for m in r.matches
    ]
    return pd.DataFrame(rows, columns=["query", "rank", "path", "similarity"])


def format_results(
    results: Sequence[SearchResult], query_skipped: Sequence[Skipped], gallery_skipped: Sequence[Skipped]
) -> str:
    """A plain-text report: per query its ranked matches, then the skipped files with the reason."""
    lines = []
    for result in results:
        lines.append(f"{result.query}")
        lines += [f"  {m.rank:>3}  {m.similarity:.4f}  {m.path}" for m in result.matches]
    for what, skipped in (("gallery file", gallery_skipped), ("query input", query_skipped)):
        if skipped:
            lines.append(f"skipped {len(skipped)} {what}(s):")
            lines += [f"  {s.path}: {s.reason}" for s in skipped]
    return "\n".join(lines)


# The picture: one row per query, the query then its matches, most similar first. Sizes in pixels.
DRAWN_MATCHES = 10  # at most this many matches per query are drawn
PANEL_PX = 128  # each image is fitted into a square panel of this side
TITLE_PX = 30  # two lines of title above each panel
GAP_PX = 8  # between panels and below each row
QUERY_GAP_PX = 24  # extra space between a query and its matches
MARGIN_PX = 10
HEADER_PX = 24


def search_figure_size(num_queries: int, num_matches: int) -> tuple[int, int]:
    """Pixel (width, height) of ``draw_search`` for this many queries and matches drawn per query."""
    columns = 1 + num_matches
    width = 2 * MARGIN_PX + columns * PANEL_PX + (columns - 1) * GAP_PX + QUERY_GAP_PX
    return width, HEADER_PX + num_queries * (TITLE_PX + PANEL_PX + GAP_PX)


def _thumbnail(path: Path) -> np.ndarray | None:
    try:
        image = Image.fromarray(load_rgb(path))
    except (CorruptImageError, OSError) as err:  # changed or removed since it was embedded
        _logger.warning("cannot draw %s: %s", path, err)
        return None
    image.thumbnail((PANEL_PX, PANEL_PX))
    return np.asarray(image)


def _short(name: str, limit: int = 20) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3) :]


def _panel(
    figure: Figure, rect: tuple[float, float, float, float], path: Path, title: str, colour: str
) -> None:
    ax = figure.add_axes(rect)
    pixels = _thumbnail(path)
    if pixels is None:
        ax.set_axis_off()
        title += "\n(unreadable now)"
    else:
        ax.imshow(pixels)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
    ax.set_title(title, fontsize=7, color=colour)


def draw_search(results: Sequence[SearchResult], out_png: str | Path, caption: str = "") -> Path:
    """Each query (framed black) and its first ``DRAWN_MATCHES`` matches, titled with rank,
    similarity and file name; size ``search_figure_size(len(results), matches drawn)``."""
    if not results:
        raise ValueError("draw_search needs at least one query with matches")
    drawn = min(DRAWN_MATCHES, max(len(r.matches) for r in results))
    width, height = search_figure_size(len(results), drawn)
    figure = _new_figure((width / DPI, height / DPI))
    if caption:
        figure.text(0.5, 1 - (HEADER_PX / 2) / height, caption, ha="center", va="center", fontsize=8)

    def rect(row: int, column: int) -> tuple[float, float, float, float]:
        left = MARGIN_PX + column * (PANEL_PX + GAP_PX) + (QUERY_GAP_PX if column else 0)
        top = HEADER_PX + row * (TITLE_PX + PANEL_PX + GAP_PX) + TITLE_PX
        return left / width, (height - top - PANEL_PX) / height, PANEL_PX / width, PANEL_PX / height

    for row, result in enumerate(results):
        _panel(figure, rect(row, 0), result.query, f"query\n{_short(result.query.name)}", "black")
        for m in result.matches[:drawn]:
            title = f"#{m.rank}  {m.similarity:.3f}\n{_short(m.path.name)}"
            _panel(figure, rect(row, m.rank), m.path, title, "tab:blue")
    return _save(figure, out_png)
