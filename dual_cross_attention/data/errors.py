"""Exceptions raised by the data package, so callers can tell a layout problem from a bug."""

from __future__ import annotations

from ..errors import DcalError


class DataError(DcalError):
    """Base class for every error about the data on disk."""


class DatasetLayoutError(DataError):
    """A dataset folder does not have the expected files; the message names the path and the tree."""


class CorruptImageError(DataError):
    """An image file cannot be decoded; the message names the file."""
