"""Errors the command line reports as one clear line (no traceback)."""


class StudyError(RuntimeError):
    """A stage that later stages depend on could not finish."""
