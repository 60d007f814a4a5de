"""The one error type for user mistakes.

Anything a user can fix (a bad spec field, a missing file, mismatched parents) raises a
subclass of `MergesearchError` whose message says what is wrong, where, and what to do.
The CLI prints it without a traceback and exits with code 2.
"""


class MergesearchError(Exception):
    """A mistake in the user's input, reported with where it is and how to fix it."""


class SpecError(MergesearchError):
    """The study spec is invalid."""


class ParentError(MergesearchError):
    """The parent checkpoints cannot be merged (missing, different architectures or shapes)."""


class ProbeError(MergesearchError):
    """A probe's data or definition is unusable."""


class StorageError(MergesearchError):
    """The study storage cannot be reached or does not hold what was asked for."""
