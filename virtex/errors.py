"""User-facing errors: the runner prints their message as one line and exits non-zero."""


class UserError(Exception):
    """A mistake in a spec, a binding, a file or a command line that the user can fix."""
