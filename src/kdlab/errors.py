"""Errors the command line reports as one clear line (no traceback). Kept free of heavy imports so
`kdlab --help` stays fast."""

from collections.abc import Sequence
from typing import Any


class StudyError(RuntimeError):
    """A stage that later stages depend on could not finish."""


class RegistryError(RuntimeError):
    """A registry operation that would corrupt the study's bookkeeping was refused."""


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
