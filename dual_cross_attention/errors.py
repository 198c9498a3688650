"""The errors this package raises on purpose: each message says what is wrong and how to fix it.

The scripts (train.py, evaluate.py, predict.py, test_fixes.py, ablate.py) print such an error as
``error: <message>`` and exit with code 1; any other exception is a bug and keeps its traceback.
"""


class DcalError(Exception):
    """Base of every error this package raises for a reason a user can act on."""


class UsageError(DcalError, ValueError):
    """An option, argument or input that cannot work as given."""


class SetupError(DcalError, RuntimeError):
    """This machine lacks what the run needs: a CUDA device, a GPU feature, an optional package."""
