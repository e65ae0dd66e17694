"""The one error type the CLI turns into a clean message and exit code 2."""


class UserError(Exception):
    """Something the user can fix: bad input, a missing file, a stage not yet run. The message says how."""
