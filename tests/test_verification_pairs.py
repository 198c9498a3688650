"""Pair lists: drawn pairs checked against itertools enumerations of every possible pair, and the CSV
and JSON readers' error messages (file, line, problem)."""

from __future__ import annotations

import itertools
import json
import logging
from collections import Counter

import pytest

from dual_cross_attention.errors import UsageError
from dual_cross_attention.verification import (
    Pair,
    PairFileError,
    generate_pairs,
    read_identities,
    read_identity_pairs,
    read_pairs,
    write_pairs,
)

# Five identities of 1..6 images; "ann" and "amy" are the twins.
IDENTITIES = {
    "ann": [f"ann/{i}.jpg" for i in range(6)],
    "amy": [f"amy/{i}.jpg" for i in range(4)],
    "bob": [f"bob/{i}.jpg" for i in range(5)],
    "cat": [f"cat/{i}.jpg" for i in range(3)],
    "dan": ["dan/0.jpg"],
}
OWNER = {image: name for name, images in IDENTITIES.items() for image in images}


def unordered(pairs) -> list[frozenset[str]]:
    return [frozenset((p.path_a, p.path_b)) for p in pairs]


def all_positives() -> set[frozenset[str]]:
    return {frozenset(c) for images in IDENTITIES.values() for c in itertools.combinations(images, 2)}


def all_negatives(identity_pairs=None) -> set[frozenset[str]]:
    if identity_pairs is None:
        identity_pairs = itertools.combinations(IDENTITIES, 2)
    return {frozenset(p) for a, b in identity_pairs for p in itertools.product(IDENTITIES[a], IDENTITIES[b])}


def split(pairs) -> tuple[list[Pair], list[Pair]]:
    return [p for p in pairs if p.same], [p for p in pairs if not p.same]


# --- generate_pairs -----------------------------------------------------------------------------


def test_pairs_are_distinct_and_correctly_labelled():
    pairs = generate_pairs(IDENTITIES, seed=0)
    keys = unordered(pairs)
    assert len(set(keys)) == len(keys)  # no pair twice, in either order
    assert all(len(k) == 2 for k in keys)  # no image with itself
    positives, negatives = split(pairs)
    assert all(OWNER[p.path_a] == OWNER[p.path_b] for p in positives)
    assert all(OWNER[p.path_a] != OWNER[p.path_b] for p in negatives)
    assert set(unordered(positives)) == all_positives()  # no cap: every positive
    assert len(negatives) == len(positives)  # default: as many negatives as positives


def test_taking_every_negative_gives_exactly_the_cross_identity_pairs(caplog):
    every = all_negatives()
    with caplog.at_level(logging.WARNING):
        negatives = split(generate_pairs(IDENTITIES, seed=0, num_negatives=10**6))[1]
    assert sorted(map(sorted, unordered(negatives))) == sorted(map(sorted, every))
    assert f"only {len(every)} different-identity pairs exist" in caplog.text


def test_random_negatives_cover_the_pool_evenly():
    # Drawing half the pool many times: every cross-identity pair turns up about equally often.
    every = all_negatives()
    counts = Counter()
    for seed in range(300):
        counts.update(
            unordered(split(generate_pairs(IDENTITIES, seed=seed, num_negatives=len(every) // 2))[1])
        )
    assert set(counts) == every
    expected = 300 * (len(every) // 2) / len(every)
    assert all(0.6 * expected < c < 1.4 * expected for c in counts.values())


def test_caps_are_respected():
    pairs = generate_pairs(IDENTITIES, seed=3, max_positives_per_identity=2, num_negatives=7)
    positives, negatives = split(pairs)
    per_identity = Counter(OWNER[p.path_a] for p in positives)
    assert per_identity == {"ann": 2, "amy": 2, "bob": 2, "cat": 2}  # dan has a single image
    assert set(unordered(positives)) <= all_positives()
    assert len(negatives) == 7 and set(unordered(negatives)) <= all_negatives()
    assert split(generate_pairs(IDENTITIES, seed=3, max_positives_per_identity=0))[0] == []


def test_hard_negatives_come_only_from_the_listed_identity_pairs(caplog):
    listed = [("amy", "ann"), ("cat", "bob"), ("ann", "amy")]  # the twins twice, in both orders
    allowed = all_negatives([("ann", "amy"), ("bob", "cat")])
    negatives = split(generate_pairs(IDENTITIES, seed=1, num_negatives=20, hard_negatives=listed))[1]
    assert len(negatives) == 20 and set(unordered(negatives)) <= allowed
    with caplog.at_level(logging.WARNING):
        everything = split(generate_pairs(IDENTITIES, seed=1, num_negatives=100, hard_negatives=listed))[1]
    assert set(unordered(everything)) == allowed and len(everything) == len(allowed) == 6 * 4 + 5 * 3
    assert "only 39 listed hard-negative pairs" in caplog.text


def test_hard_negatives_must_name_known_distinct_identities():
    with pytest.raises(UsageError, match=r"not in the mapping: \['eve', 'zed'\]"):
        generate_pairs(IDENTITIES, seed=0, hard_negatives=[("ann", "eve"), ("zed", "bob")])
    with pytest.raises(UsageError, match="with themselves"):
        generate_pairs(IDENTITIES, seed=0, hard_negatives=[("ann", "ann")])


def test_seed_decides_the_draw():
    def draw(seed, identities=IDENTITIES):
        return generate_pairs(identities, seed=seed, max_positives_per_identity=3, num_negatives=15)

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)
    assert draw(5, dict(reversed(list(IDENTITIES.items())))) == draw(5)  # mapping order does not matter


def test_an_image_belongs_to_one_identity():
    with pytest.raises(UsageError, match="under both 'ann' and 'bob'"):
        generate_pairs({"ann": ["x.jpg"], "bob": ["x.jpg", "y.jpg"]}, seed=0)
    with pytest.raises(UsageError, match="listed twice"):
        generate_pairs({"ann": ["x.jpg", "x.jpg"], "bob": ["y.jpg"]}, seed=0)
    with pytest.raises(UsageError, match="list of image paths"):
        generate_pairs({"ann": "x.jpg", "bob": ["y.jpg"]}, seed=0)
    with pytest.raises(UsageError, match="num_negatives must be >= 0"):
        generate_pairs(IDENTITIES, seed=0, num_negatives=-1)


# --- files --------------------------------------------------------------------------------------


def test_write_then_read_gives_the_same_pairs(tmp_path):
    pairs = generate_pairs(IDENTITIES, seed=2, max_positives_per_identity=4)
    path = write_pairs(pairs, tmp_path / "lists" / "pairs.csv")
    assert path.read_text().splitlines()[0] == "path_a,path_b,same"
    assert read_pairs(path) == pairs


def test_read_pairs_checks_the_files_exist_and_lists_every_missing_one(tmp_path):
    (tmp_path / "a.jpg").touch()
    csv = tmp_path / "pairs.csv"
    csv.write_text("path_a,path_b,same\na.jpg,b.jpg,1\na.jpg,c.jpg,0\n")
    assert len(read_pairs(csv)) == 2  # no root: paths are not checked
    with pytest.raises(PairFileError, match="2 image") as err:
        read_pairs(csv, root=tmp_path)
    assert "b.jpg" in str(err.value) and "c.jpg" in str(err.value)
    (tmp_path / "b.jpg").touch()
    (tmp_path / "c.jpg").touch()
    assert read_pairs(csv, root=tmp_path)[1] == Pair("a.jpg", "c.jpg", False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("path_a,path_b\na,b\n", r"line 1: missing column\(s\) \['same'\]"),
        ("path_a,path_b,same,note\na,b,1,x\n", r"line 1: unexpected column\(s\) \['note'\]"),
        ("path_a,path_b,same\n", "no rows follow"),
        ("path_a,path_b,same\na,b,1\nc,d,2\n", "line 3: same must be 0 or 1, got '2'"),
        ("path_a,path_b,same\na,b,1\nc,d,yes\n", "line 3: same must be 0 or 1"),
        ("path_a,path_b,same\na,b,1\n\nc,d\n", "line 4: expected 3 fields"),
        ("path_a,path_b,same\na,,1\n", "line 2: empty path_b"),
        ("path_a,path_b,same\na,a,1\n", "line 2: pairs a with itself"),
        ("path_a,path_b,same\na,b,1\nc,d,0\nb,a,1\n", "line 4: the pair is already on line 2"),
    ],
)
def test_malformed_pair_files_name_the_line(tmp_path, text, message):
    csv = tmp_path / "bad.csv"
    csv.write_text(text)
    with pytest.raises(PairFileError, match=message) as err:
        read_pairs(csv)
    assert str(csv) in str(err.value)


def test_every_bad_row_is_reported_in_line_order(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("path_a,path_b,same\na,b,2\nc,d\ne,f,1\ng,h,x\n")
    with pytest.raises(PairFileError) as err:
        read_pairs(csv)
    lines = [line.split(":")[0].strip() for line in str(err.value).splitlines()[1:]]
    assert lines == ["line 2", "line 3", "line 5"]


def test_read_identity_pairs(tmp_path):
    csv = tmp_path / "twins.csv"
    csv.write_text("identity_a,identity_b\nann,amy\nbob,cat\n")
    assert read_identity_pairs(csv) == [("ann", "amy"), ("bob", "cat")]
    csv.write_text("ann,amy\nbob,cat\n")  # no header
    with pytest.raises(PairFileError, match="line 1: missing column"):
        read_identity_pairs(csv)
    csv.write_text("identity_a,identity_b\nann,amy\nbob,\ncat,cat\n")
    with pytest.raises(PairFileError, match="line 3: empty identity_b") as err:
        read_identity_pairs(csv)
    assert "line 4: pairs identity 'cat' with itself" in str(err.value)
    with pytest.raises(PairFileError, match="no such file"):
        read_identity_pairs(tmp_path / "missing.csv")


def test_read_identities(tmp_path):
    path = tmp_path / "identities.json"
    path.write_text(json.dumps(IDENTITIES))
    assert read_identities(path) == IDENTITIES
    path.write_text('{"ann": ["a.jpg"],\n "bob": ["b.jpg",]}')
    with pytest.raises(PairFileError, match="line 2: not valid JSON"):
        read_identities(path)
    path.write_text('{"ann": "a.jpg"}')
    with pytest.raises(PairFileError, match="identity 'ann': expected a list"):
        read_identities(path)
