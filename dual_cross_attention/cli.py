"""What every script's command line shares: the parser, ``--set`` overrides and the log format."""

from __future__ import annotations

import argparse
import logging
import sys


def script_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose help is the script's docstring, laid out as written."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_overrides(parser: argparse.ArgumentParser, help_text: str) -> None:
    """``--set section.key=value ...`` (repeatable), collected into ``args.overrides``."""
    parser.add_argument(
        "--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE", help=help_text
    )


def configure_logging() -> None:
    """The package logs at INFO with a timestamp; scripts print their final report themselves."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )


def failure_status(err: BaseException, interrupted: str = "") -> int:
    """The one line a script ends with when its work raised ``err`` (a ``DcalError`` or Ctrl-C),
    on stderr, and the exit status: 1 for an error, 130 for an interrupt (``interrupted`` says what
    was kept). Scripts catch only those two, so anything else still shows its traceback."""
    if isinstance(err, KeyboardInterrupt):
        print(f"interrupted: {interrupted}" if interrupted else "interrupted", file=sys.stderr)
        return 130
    print(f"error: {err}", file=sys.stderr)
    return 1
