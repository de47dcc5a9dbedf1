"""User-facing errors: the harness prints these as one clear line, without a traceback."""


class UserError(Exception):
    """Bad input or configuration that the user must fix."""


class ResolutionMismatchError(UserError):
    pass
