"""Errors meant for the user: the CLI prints their message as one line and exits non-zero.

Anything else that escapes a stage is a bug and keeps its traceback.
"""


class PipelineError(Exception):
    """Base class: what went wrong, where, and what to do about it."""


class DataError(PipelineError):
    """Input data that cannot be read or does not have the expected shape."""


class ChecksumError(DataError):
    """A file whose content does not match its known checksum."""


class FetchError(DataError):
    """No mirror could deliver a file."""


class MissingInputError(PipelineError):
    """A stage input that an earlier stage should have made is missing or unreadable."""
