"""The one line and exit status every script ends with on an error or Ctrl-C."""

from __future__ import annotations

from dual_cross_attention.cli import failure_status
from dual_cross_attention.errors import UsageError


def test_an_error_is_one_line_and_status_1(capsys):
    assert failure_status(UsageError("--top must be >= 1"), "ignored for errors") == 1
    assert capsys.readouterr().err == "error: --top must be >= 1\n"


def test_an_interrupt_says_what_was_kept_and_status_130(capsys):
    assert failure_status(KeyboardInterrupt(), "no model was written") == 130
    assert capsys.readouterr().err == "interrupted: no model was written\n"
    assert failure_status(KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == "interrupted\n"
