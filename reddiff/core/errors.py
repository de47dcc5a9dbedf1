"""User-facing errors: the harness prints these as one clear line, without a traceback."""


class UserError(Exception):
    """Bad input or configuration that the user must fix."""


class ResolutionMismatchError(UserError):
    pass


class SamplerInputError(UserError, ValueError):
    """A batch a sampler cannot take as given (e.g. items pooled into one particle system whose measurements
    differ); a ValueError for library callers, one line for ``run.py``."""
