"""Errors the command line reports as one clear line (no traceback), and its exit codes. Kept free of heavy
imports so `kdlab --help` stays fast."""

from collections.abc import Sequence
from typing import Any

# Exit codes of `kdlab` (documented in `kdlab --help`).
EXIT_OK = 0
EXIT_FAILED = 1  # the command ran but a run or stage failed (see `kdlab status`)
EXIT_USAGE = 2  # refused before any work: bad command, config, data, model path, cache or registry


class StudyError(RuntimeError):
    """A stage that later stages depend on could not finish."""


class RegistryError(RuntimeError):
    """A registry operation that would corrupt the study's bookkeeping was refused, or the registry file
    cannot be used (unreadable, read-only, not a registry)."""


class DataError(ValueError):
    """A data file (or the data source) cannot be used; the message names the file and what is wrong."""


class CacheError(Exception):
    """The cache is absent, incomplete, corrupt or unusable."""


class CacheExistsError(CacheError, FileExistsError):
    """Refusing to build over an existing cache (or a foreign non-empty directory)."""


class CacheMismatchError(CacheError):
    """The cache was built from different fingerprint inputs than the ones requested.

    ``differences`` lists ``(key, cached_value, requested_value)``; it is empty when only a bare
    fingerprint (no inputs) was given to compare against.
    """

    def __init__(self, message: str, differences: Sequence[tuple[str, Any, Any]] = ()) -> None:
        super().__init__(message)
        self.differences = list(differences)
