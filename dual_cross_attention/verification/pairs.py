"""Verification pairs on disk and drawn from an identity -> images mapping.

A pair list is a CSV with the header ``path_a,path_b,same``: one pair per line, image paths
relative to the data root, ``same`` 1 for a same-identity pair and 0 otherwise. ``read_pairs``
and ``write_pairs`` read and write exactly that format (a round trip gives the same pairs).

``generate_pairs`` draws such a list from ``{identity: [image paths]}`` (``read_identities``
loads one from JSON); its negatives can be restricted to confusable identity pairs such as
twins (``read_identity_pairs`` loads ``identity_a,identity_b`` CSVs). Pairs are unordered:
(a, b) and (b, a) are the same pair, and a list never holds both.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import ArrayLike

from ..data.errors import DataError
from ..errors import UsageError

_logger = logging.getLogger(__name__)

PAIR_COLUMNS = ("path_a", "path_b", "same")
IDENTITY_PAIR_COLUMNS = ("identity_a", "identity_b")
MAX_LISTED = 20  # an error lists at most this many problems, then says how many more there are


class PairFileError(DataError):
    """A pair, identity or identity-pair file is malformed or names images that are missing; the
    message names the file and, for each problem, the line."""


@dataclass(frozen=True)
class Pair:
    """Two images and whether they show the same identity.

    Args:
        path_a: first image, relative to the data root.
        path_b: second image, relative to the data root.
        same: True for a same-identity pair.
    """

    path_a: str
    path_b: str
    same: bool

    @property
    def key(self) -> frozenset[str]:
        """The pair without its order: equal for (a, b) and (b, a)."""
        return frozenset((self.path_a, self.path_b))


def _problems(path: Path, what: str, problems: Sequence[str]) -> PairFileError:
    shown = "\n  ".join(problems[:MAX_LISTED])
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    return PairFileError(f"{path}: {what}:\n  {shown}{more}")


def _by_line(problems: list[tuple[int, str]]) -> list[str]:
    return [f"line {line}: {problem}" for line, problem in sorted(problems)]


def _read_rows(
    path: Path, columns: Sequence[str]
) -> tuple[list[tuple[int, dict[str, str]]], list[tuple[int, str]]]:
    """Rows of a CSV with exactly ``columns``, and its bad rows.

    Returns:
        (line number, {column: stripped value}) for each well-formed non-blank row, and one
        (line number, problem) per row with the wrong number of fields or an empty field (for the
        caller to report together with its own checks).

    Raises:
        PairFileError: no such file, an empty file, a header without exactly ``columns``, or a
            header and nothing else.
    """
    if not path.is_file():
        raise PairFileError(f"{path}: no such file")
    expected = ",".join(columns)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise PairFileError(f"{path}: the file is empty; it must start with the header {expected}")
        header = [name.strip() for name in header]
        missing = [c for c in columns if c not in header]
        unknown = [c for c in header if c not in columns]
        if missing or unknown or len(header) != len(columns):
            found = ",".join(header)
            detail = f"missing column(s) {missing}" if missing else f"unexpected column(s) {unknown}"
            if not missing and not unknown:
                detail = "a column is repeated"
            raise PairFileError(f"{path}, line 1: {detail}; the header must be {expected}, got {found}")
        rows: list[tuple[int, dict[str, str]]] = []
        problems: list[tuple[int, str]] = []
        for fields in reader:
            line = reader.line_num
            if not any(f.strip() for f in fields):
                continue  # blank line
            if len(fields) != len(header):
                problems.append((line, f"expected {len(header)} fields ({expected}), got {len(fields)}"))
                continue
            row = {name: value.strip() for name, value in zip(header, fields, strict=True)}
            empty = [c for c in columns if not row[c]]
            if empty:
                problems.append((line, f"empty {', '.join(empty)}"))
                continue
            rows.append((line, row))
    if not rows and not problems:
        raise PairFileError(f"{path}: the header is there but no rows follow")
    return rows, problems


def read_pairs(csv_path: str | Path, root: str | Path | None = None) -> list[Pair]:
    """Read a ``path_a,path_b,same`` pair list.

    Args:
        csv_path: the CSV file.
        root: the data root the paths are relative to. When given, every image must exist under it;
            all missing ones are reported together. The pairs keep the paths as written.

    Raises:
        PairFileError: a malformed file (see ``_read_rows``), ``same`` not 0 or 1, a pair of an
            image with itself, a pair listed twice (in either order), or missing images.
    """
    path = Path(csv_path)
    pairs: list[Pair] = []
    rows, problems = _read_rows(path, PAIR_COLUMNS)
    first_line: dict[frozenset[str], int] = {}
    for line, row in rows:
        if row["same"] not in ("0", "1"):
            problems.append((line, f"same must be 0 or 1, got {row['same']!r}"))
            continue
        pair = Pair(row["path_a"], row["path_b"], row["same"] == "1")
        if pair.path_a == pair.path_b:
            problems.append((line, f"pairs {pair.path_a} with itself"))
            continue
        if pair.key in first_line:
            problems.append((line, f"the pair is already on line {first_line[pair.key]}"))
            continue
        first_line[pair.key] = line
        pairs.append(pair)
    if problems:
        raise _problems(path, "bad pairs", _by_line(problems))
    if root is not None:
        base = Path(root)
        images = dict.fromkeys(p for pair in pairs for p in (pair.path_a, pair.path_b))
        missing = [p for p in images if not (base / p).is_file()]
        if missing:
            raise _problems(path, f"{len(missing)} image(s) not found under {base}", missing)
    return pairs


def write_pairs(pairs: Iterable[Pair], path: str | Path) -> Path:
    """Write ``pairs`` as the ``path_a,path_b,same`` CSV that ``read_pairs`` reads; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(PAIR_COLUMNS)
        for pair in pairs:
            writer.writerow((pair.path_a, pair.path_b, int(pair.same)))
    return out


def read_pair_list(csv_path: str | Path) -> list[tuple[str, str, bool | None]]:
    """Pairs to decide: a ``path_a,path_b,same`` list (as ``read_pairs``) or an unlabelled
    ``path_a,path_b`` one, whose pairs come back with ``same`` None. Images are not checked here.

    Raises:
        PairFileError: as ``read_pairs``; for an unlabelled list, a malformed row, a pair of an image
            with itself or a pair listed twice.
    """
    path = Path(csv_path)
    if not path.is_file():
        raise PairFileError(f"{path}: no such file")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = [name.strip() for name in next(csv.reader(handle), [])]
    if "same" in header:
        return [(p.path_a, p.path_b, p.same) for p in read_pairs(path)]
    rows, problems = _read_rows(path, PAIR_COLUMNS[:2])
    pairs: list[tuple[str, str, bool | None]] = []
    first_line: dict[frozenset[str], int] = {}
    for line, row in rows:
        a, b = row["path_a"], row["path_b"]
        key = frozenset((a, b))
        if a == b:
            problems.append((line, f"pairs {a} with itself"))
        elif key in first_line:
            problems.append((line, f"the pair is already on line {first_line[key]}"))
        else:
            first_line[key] = line
            pairs.append((a, b, None))
    if problems:
        raise _problems(path, "bad pairs", _by_line(problems))
    return pairs


def read_identities(json_path: str | Path) -> dict[str, list[str]]:
    """Load ``{identity: [image paths]}`` from a JSON object (paths relative to the data root).

    Raises:
        PairFileError: no such file, invalid JSON, not an object of lists of non-empty strings.
    """
    path = Path(json_path)
    if not path.is_file():
        raise PairFileError(f"{path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise PairFileError(f"{path}, line {err.lineno}: not valid JSON: {err.msg}") from err
    if not isinstance(data, dict):
        raise PairFileError(f"{path}: must hold a JSON object {{identity: [image paths]}}")
    problems = [
        f"identity {name!r}: expected a list of image paths"
        for name, images in data.items()
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images)
    ]
    if problems:
        raise _problems(path, "bad identities", problems)
    return {str(name): list(images) for name, images in data.items()}


def read_identity_pairs(csv_path: str | Path) -> list[tuple[str, str]]:
    """Read confusable identity pairs (e.g. twins) from an ``identity_a,identity_b`` CSV.

    Raises:
        PairFileError: a malformed file (see ``_read_rows``) or an identity paired with itself.
    """
    path = Path(csv_path)
    pairs: list[tuple[str, str]] = []
    rows, problems = _read_rows(path, IDENTITY_PAIR_COLUMNS)
    for line, row in rows:
        a, b = row["identity_a"], row["identity_b"]
        if a == b:
            problems.append((line, f"pairs identity {a!r} with itself"))
        pairs.append((a, b))
    if problems:
        raise _problems(path, "bad identity pairs", _by_line(problems))
    return pairs


class _Blocks:
    """Pairs laid out as consecutive blocks, so pair number k is found without listing them all and
    drawing k without replacement draws pairs without duplicates. Block b pairs each image of
    ``images[first[b] : first[b] + rows[b]]`` with each of ``images[second[b] : second[b] + columns[b]]``.

    Args:
        images: every image, grouped by identity.
        first, rows, second, columns: (B,) per block, where its two image ranges start and their lengths.
    """

    def __init__(
        self, images: Sequence[str], first: ArrayLike, rows: ArrayLike, second: ArrayLike, columns: ArrayLike
    ) -> None:
        self.images = images
        self.first, self.rows, self.second, self.columns = (
            np.asarray(v, dtype=np.int64) for v in (first, rows, second, columns)
        )
        self.starts = np.concatenate(([0], np.cumsum(self.rows * self.columns)))

    @property
    def size(self) -> int:
        return int(self.starts[-1])

    def pairs(self, ks: Sequence[int]) -> list[tuple[str, str]]:
        """The pairs numbered ``ks`` (each in [0, size))."""
        k = np.asarray(ks, dtype=np.int64)
        # The last block starting at or before k holds it (empty blocks share their start with the next).
        b = np.searchsorted(self.starts, k, side="right") - 1
        row, column = np.divmod(k - self.starts[b], self.columns[b])
        a, c = (self.first[b] + row).tolist(), (self.second[b] + column).tolist()
        return [(self.images[i], self.images[j]) for i, j in zip(a, c, strict=True)]


def _draw(count: int, size: int, rng: np.random.Generator) -> list[int]:
    """``min(count, size)`` distinct indices below ``size``, ascending."""
    if count >= size:
        return list(range(size))
    return sorted(int(k) for k in rng.choice(size, count, replace=False))


def _positives(images: Sequence[str], cap: int | None, rng: np.random.Generator) -> list[Pair]:
    n = len(images)
    total = n * (n - 1) // 2
    chosen = _draw(total if cap is None else cap, total, rng)
    pairs = []
    for k in chosen:
        # Pair k of the list (0,1), (0,2), (1,2), (0,3), ...: j is the largest with j(j-1)/2 <= k.
        j = (1 + math.isqrt(1 + 8 * k)) // 2
        i = k - j * (j - 1) // 2
        pairs.append(Pair(images[i], images[j], True))
    return pairs


def _check_identities(identities: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    if not identities:
        raise UsageError("generate_pairs needs at least one identity")
    owner: dict[str, str] = {}
    problems: list[str] = []
    for name in sorted(identities):
        members = identities[name]
        if isinstance(members, str) or not all(isinstance(image, str) and image for image in members):
            problems.append(f"identity {name!r} must map to a list of image paths")
            continue
        for image in members:
            if image in owner:
                where = "twice" if owner[image] == name else f"under both {owner[image]!r} and {name!r}"
                problems.append(f"image {image!r} is listed {where}")
            owner[image] = name
    if problems:
        raise UsageError(
            "bad identities (each maps to its own image paths, each path once):\n  " + "\n  ".join(problems)
        )
    return {name: list(identities[name]) for name in sorted(identities)}


def _negative_blocks(
    identities: dict[str, list[str]], hard_negatives: Sequence[tuple[str, str]] | None
) -> _Blocks:
    images = [image for members in identities.values() for image in members]
    sizes = np.array([len(v) for v in identities.values()], dtype=np.int64)
    ends = np.cumsum(sizes)
    offset = dict(zip(identities, (ends - sizes).tolist(), strict=True))
    if hard_negatives is None:
        # Any two images of different identities: image i pairs with every image of the identities
        # after its own in the grouped list, so each unordered pair comes up once.
        after = np.repeat(ends, sizes)  # (M,) where the next identity starts, per image
        return _Blocks(images, np.arange(len(images)), np.ones(len(images)), after, len(images) - after)
    unknown = sorted({name for pair in hard_negatives for name in pair if name not in identities})
    if unknown:
        raise UsageError(f"hard_negatives name identities that are not in the mapping: {unknown}")
    selves = sorted({a for a, b in hard_negatives if a == b})
    if selves:
        raise UsageError(f"hard_negatives pair identities with themselves: {selves}")
    # (a, b) and (b, a) list the same confusable pair: keep it once.
    listed = sorted({tuple(sorted(pair)) for pair in hard_negatives})
    return _Blocks(
        images,
        [offset[a] for a, _ in listed],
        [len(identities[a]) for a, _ in listed],
        [offset[b] for _, b in listed],
        [len(identities[b]) for _, b in listed],
    )


def generate_pairs(
    identities: Mapping[str, Sequence[str]],
    *,
    seed: int,
    max_positives_per_identity: int | None = None,
    num_negatives: int | None = None,
    hard_negatives: Sequence[tuple[str, str]] | None = None,
) -> list[Pair]:
    """Draw verification pairs: same-identity positives, then different-identity negatives.

    Each possible pair is drawn at most once (in either order), never an image with itself, and
    the result depends only on the arguments (identities are visited in sorted order, so the
    mapping's order does not matter). Positives are listed identity by identity, negatives after.

    Args:
        identities: identity -> its image paths; an image may belong to one identity only.
        seed: seeds the draws.
        max_positives_per_identity: keep at most this many of an identity's positive pairs, drawn at
            random; None keeps them all.
        num_negatives: how many negatives to draw; None draws as many as there are positives. When
            fewer distinct negatives exist, all of them are taken and a warning is logged.
        hard_negatives: when given, negatives pair only images of these identity pairs (e.g. twins);
            otherwise any two images of different identities.

    Raises:
        UsageError: no identities, an image listed twice, a count below 0, or a hard-negative
            identity that is not in ``identities`` or is paired with itself.
    """
    for name, value in (
        ("max_positives_per_identity", max_positives_per_identity),
        ("num_negatives", num_negatives),
    ):
        if value is not None and value < 0:
            raise UsageError(f"{name} must be >= 0, got {value}")
    mapping = _check_identities(identities)
    rng = np.random.default_rng(seed)
    positives = [
        p for images in mapping.values() for p in _positives(images, max_positives_per_identity, rng)
    ]
    blocks = _negative_blocks(mapping, hard_negatives)
    wanted = len(positives) if num_negatives is None else num_negatives
    if wanted > blocks.size:
        kind = "listed hard-negative" if hard_negatives is not None else "different-identity"
        _logger.warning(
            "asked for %d negatives but only %d %s pairs exist: using all of them", wanted, blocks.size, kind
        )
    negatives = [Pair(a, b, same=False) for a, b in blocks.pairs(_draw(wanted, blocks.size, rng))]
    return positives + negatives
