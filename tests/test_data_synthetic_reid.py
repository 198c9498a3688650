"""The synthetic Re-ID demo: Market-1501 names and counts, disjoint splits, deterministic, unique
look-alike identities that differ only in their attributes, and its chance levels."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dual_cross_attention.data import DatasetLayoutError
from dual_cross_attention.data.synthetic import mark_mask
from dual_cross_attention.data.synthetic_reid import (
    DEFAULT_REID_ROOT,
    NUM_LOOKS,
    Look,
    ReIDDemoSpec,
    camera_style,
    chance_levels,
    generate_reid_demo,
    identities,
    render_reid_image,
)

# Market-1501 names, written independently of the generator: pid (-1 or 4 digits), camera, frame, box.
NAME = re.compile(r"^(-1|\d{4})_c(\d)s1_(\d{6})_(\d{2})\.jpg$")
FOLDERS = ("bounding_box_train", "query", "bounding_box_test")
SPEC = ReIDDemoSpec()
SMALL = ReIDDemoSpec(
    seed=3, num_train_ids=4, num_test_ids=3, train_per_camera=1, gallery_per_camera=1, distractors=2, junk=1
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return generate_reid_demo(tmp_path_factory.mktemp("reid") / "demo_reid", SPEC)


def _parse(root: Path) -> dict[str, list[tuple[int, int, int]]]:
    """(pid, 1-based camera, frame) of every file of each folder; fails on a name that is not Market's."""
    parsed = {}
    for folder in FOLDERS:
        rows = []
        for path in sorted((root / folder).iterdir()):
            match = NAME.match(path.name)
            assert match, f"{folder}/{path.name} is not a Market-1501 name"
            rows.append((int(match.group(1)), int(match.group(2)), int(match.group(3))))
        parsed[folder] = rows
    return parsed


def _pixels(root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(root)): np.asarray(Image.open(p)) for p in sorted(root.rglob("*.jpg"))}


def test_names_parse_back_to_the_planned_identities_and_cameras(demo):
    parsed = _parse(demo)
    train_pids = {i.pid for i in identities(SPEC) if i.split == "train"}
    test_pids = {i.pid for i in identities(SPEC) if i.split == "test"}
    cameras = range(1, 4)
    assert Counter((p, c) for p, c, _ in parsed["bounding_box_train"]) == {
        (p, c): 3 for p in train_pids for c in cameras
    }
    query = Counter((p, c) for p, c, _ in parsed["query"])
    assert set(query.values()) == {1}
    assert Counter(p for p, _ in query) == {p: 2 for p in test_pids}  # two cameras per identity
    assert Counter(c for _, c in query) == {1: 20, 2: 20, 3: 20}  # query cameras rotate
    gallery = Counter((p, c) for p, c, _ in parsed["bounding_box_test"])
    identity_part = {k: v for k, v in gallery.items() if k[0] > 0}
    assert identity_part == {(p, c): 2 for p in test_pids for c in cameras}
    assert sum(v for (p, _), v in gallery.items() if p == 0) == 8
    assert sum(v for (p, _), v in gallery.items() if p == -1) == 4
    frames = [f for rows in parsed.values() for _, _, f in rows]
    assert len(frames) == len(set(frames))  # every file name is unique over the whole set
    names = sorted(p.name for p in (demo / "bounding_box_test").iterdir())
    assert any(n.startswith("-1_c") for n in names) and any(n.startswith("0000_c") for n in names)


def test_counts_per_folder_match_the_spec(demo):
    parsed = _parse(demo)
    # 42 ids x 3 cameras x 3; 30 ids x 2 query cameras; 30 ids x 3 cameras x 2 + 8 distractors + 4 junk
    assert {f: len(rows) for f, rows in parsed.items()} == {
        "bounding_box_train": 378,
        "query": 60,
        "bounding_box_test": 192,
    }
    assert len({p for p, _, _ in parsed["bounding_box_train"]}) == 42
    assert len({p for p, _, _ in parsed["query"]}) == 30
    assert json.loads((demo / "demo_info.json").read_text())["num_train_ids"] == 42


def test_train_and_test_identities_are_disjoint_and_queries_are_in_the_gallery(demo):
    parsed = _parse(demo)
    train = {p for p, _, _ in parsed["bounding_box_train"]}
    query = {p for p, _, _ in parsed["query"]}
    gallery = {p for p, _, _ in parsed["bounding_box_test"] if p > 0}
    assert min(train) > 0 and not train & (query | gallery)
    assert query == gallery
    assert len(train | query) == 72 and max(train | query) == 72  # pids 1..72, interleaved
    assert not train <= set(range(1, 43))


def test_every_query_has_a_true_match_in_another_camera(demo):
    parsed = _parse(demo)
    for pid, camera, _ in parsed["query"]:
        others = [c for p, c, _ in parsed["bounding_box_test"] if p == pid and c != camera]
        assert len(others) == 4, (pid, camera)


def test_images_have_the_spec_size(demo, tmp_path):
    assert {a.shape for a in _pixels(demo).values()} == {(64, 32, 3)}
    spec = ReIDDemoSpec(seed=1, height=128, width=48, num_train_ids=2, num_test_ids=2, distractors=1, junk=1)
    assert {a.shape for a in _pixels(generate_reid_demo(tmp_path / "big", spec)).values()} == {(128, 48, 3)}


def test_same_spec_gives_identical_files_and_another_seed_differs(tmp_path):
    a = generate_reid_demo(tmp_path / "a", SMALL)
    b = generate_reid_demo(tmp_path / "b", SMALL)
    files = {str(p.relative_to(a)): p.read_bytes() for p in a.rglob("*") if p.is_file()}
    assert files == {str(p.relative_to(b)): p.read_bytes() for p in b.rglob("*") if p.is_file()}
    pixels_a, pixels_b = _pixels(a), _pixels(b)
    assert len(pixels_a) == 4 * 3 + 3 * 2 + 3 * 3 + 2 + 1
    assert all(np.array_equal(pixels_a[k], pixels_b[k]) for k in pixels_a)
    other = _pixels(generate_reid_demo(tmp_path / "c", dataclasses.replace(SMALL, seed=4)))
    common = pixels_a.keys() & other.keys()
    assert common and all(not np.array_equal(pixels_a[k], other[k]) for k in common)


def test_every_identity_has_its_own_combination_of_attributes():
    looks = [i.look for i in identities(SPEC)]
    assert len(looks) == NUM_LOOKS == 72 and len(set(looks)) == 72
    for seed in (1, 2):
        assert len({i.look for i in identities(ReIDDemoSpec(seed=seed, num_train_ids=20))}) == 50


def _distance(a: Look, b: Look) -> int:
    """How many of the four attributes differ."""
    return sum(x != y for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b), strict=True))


def test_identities_are_look_alikes():
    """Most pairs differ in at most two of the four attributes (34 of each identity's 71 others),
    each identity has nine that differ in one, and in its own split one that differs only in the
    mark (so colour, silhouette and accessory alone never single it out)."""
    ids = identities(SPEC)
    distances = Counter(_distance(a.look, b.look) for a, b in itertools.combinations(ids, 2))
    assert distances[0] == 0
    assert (distances[1] + distances[2]) / sum(distances.values()) == pytest.approx(34 / 71)
    for ident in ids:
        near = [o for o in ids if _distance(ident.look, o.look) == 1]
        assert len(near) == 9
        siblings = [o for o in near if o.split == ident.split and o.look.mark != ident.look.mark]
        assert siblings, f"pid {ident.pid} has no mark-only look-alike in {ident.split}"


def _mark_cells(changed: np.ndarray, x: int, y: int, shape: tuple[int, int]) -> np.ndarray:
    expected = np.zeros(shape, dtype=bool)
    for copy in range(2):
        expected[y : y + 8, x + 8 * copy : x + 8 * copy + 8] = changed
    return expected


@pytest.mark.parametrize("zone, accessory", [(0, 0), (1, 1), (0, 1)])
def test_identities_differ_only_in_their_marks_on_the_patch_grid(zone, accessory):
    """Two looks that differ only in the mark, drawn with the same generator: the images differ in
    exactly the cells where the two patterns differ, in two side-by-side 8 px grid cells. So the
    identity is in the attributes alone; everything else comes from the image's own draws."""
    style = camera_style(0, 2, 3)
    changed = mark_mask(0) != mark_mask(3)
    grid = [(x, y) for x in range(0, 32, 8) for y in range(0, 64, 8)]
    for i in range(15):
        images = [
            render_reid_image(Look(1, mark, zone, accessory), np.random.default_rng([7, i]), style, 64, 32)
            for mark in (0, 3)
        ]
        differs = np.abs(images[0].astype(int) - images[1].astype(int)).sum(-1) > 0
        assert any(np.array_equal(differs, _mark_cells(changed, x, y, (64, 32))) for x, y in grid), i


def test_nuisances_change_every_image_and_cameras_differ(demo):
    """Two images of one identity are never alike pixel for pixel, and the mean colour of an image
    mostly tells its camera (nearest camera mean; 86% of the training images, chance 33%), as the
    per-camera cast and background hue intend."""
    parsed = _parse(demo)
    paths = sorted((demo / "bounding_box_train").iterdir())
    images = np.stack([np.asarray(Image.open(p)).astype(float) for p in paths])
    cameras = np.array([c for _, c, _ in parsed["bounding_box_train"]])
    pids = np.array([p for p, _, _ in parsed["bounding_box_train"]])
    same_pid = images[pids == pids[0]]
    assert min(np.abs(a - b).mean() for a, b in itertools.combinations(same_pid, 2)) > 10
    means = images.mean((1, 2))
    centroids = np.stack([means[cameras == c].mean(0) for c in (1, 2, 3)])
    predicted = np.argmin(((means[:, None] - centroids[None]) ** 2).sum(-1), axis=1) + 1
    assert (predicted == cameras).mean() > 0.75


def test_chance_levels_match_a_simulation_of_random_rankings(demo):
    """Rank-1 and mAP of random rankings over the files on disk (junk and same-camera matches
    left out, distractors kept), against the closed forms of ``chance_levels``."""
    parsed = _parse(demo)
    gallery = np.array([(p, c) for p, c, _ in parsed["bounding_box_test"] if p >= 0])
    rng = np.random.default_rng(0)
    rank1, aps = [], []
    for pid, camera, _ in parsed["query"]:
        kept = gallery[~((gallery[:, 0] == pid) & (gallery[:, 1] == camera))]
        match = kept[:, 0] == pid
        order = np.argsort(rng.random((400, len(kept))), axis=1)  # 400 random rankings
        hits = match[order]  # (400, n) True where a true match is ranked
        precision = np.cumsum(hits, axis=1) / np.arange(1, len(kept) + 1)
        aps.append((precision * hits).sum(1) / match.sum())
        rank1.append(hits[:, 0])
    chance = chance_levels(SPEC)
    assert chance.rank1 == pytest.approx(100 * 4 / 186)
    assert 100 * np.mean(rank1) == pytest.approx(chance.rank1, abs=0.3)
    assert 100 * np.mean(aps) == pytest.approx(chance.mAP, abs=0.3)
    assert chance.mAP == pytest.approx(4.69, abs=0.01)


def test_existing_set_is_reused_and_a_changed_spec_regenerates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = generate_reid_demo(spec=SMALL)
    assert root == DEFAULT_REID_ROOT and (tmp_path / "data" / "demo_reid" / "query").is_dir()
    info = root / "demo_info.json"
    stamp = info.stat().st_mtime_ns
    assert generate_reid_demo(root, SMALL) == root
    assert info.stat().st_mtime_ns == stamp
    generate_reid_demo(root, dataclasses.replace(SMALL, junk=0))
    assert not [p for p in (root / "bounding_box_test").iterdir() if p.name.startswith("-1_")]
    assert not [p for p in root.parent.iterdir() if p.name != "demo_reid"]  # no temp dirs left behind


def test_set_from_an_older_generator_is_regenerated(tmp_path):
    root = generate_reid_demo(tmp_path / "demo_reid", SMALL)
    info = root / "demo_info.json"
    recorded = json.loads(info.read_text())
    info.write_text(json.dumps(recorded | {"version": recorded["version"] - 1}))
    (root / "query" / "stale.jpg").write_bytes(b"stale")
    generate_reid_demo(root, SMALL)
    assert not (root / "query" / "stale.jpg").exists()
    assert json.loads(info.read_text()) == recorded


def test_foreign_directory_is_never_overwritten(tmp_path):
    (tmp_path / "demo_reid").mkdir()
    (tmp_path / "demo_reid" / "mine.txt").write_text("precious")
    with pytest.raises(DatasetLayoutError, match="demo_info.json"):
        generate_reid_demo(tmp_path / "demo_reid", SMALL)
    assert (tmp_path / "demo_reid" / "mine.txt").read_text() == "precious"


def test_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="multiple of 8"):
        ReIDDemoSpec(width=36)
    with pytest.raises(ValueError, match="at least 64"):
        ReIDDemoSpec(height=56)
    with pytest.raises(ValueError, match="at most 72"):
        ReIDDemoSpec(num_train_ids=50, num_test_ids=30)
    with pytest.raises(ValueError, match="query_cameras"):
        ReIDDemoSpec(query_cameras=4)
    with pytest.raises(ValueError, match="num_cameras"):
        ReIDDemoSpec(num_cameras=1)
