"""User-facing errors: the runner prints their message as one line and exits non-zero."""

import re


class UserError(Exception):
    """A mistake in a spec, a binding, a file or a command line that the user can fix."""


_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+")
_RAISED = re.compile(r"^(?:\w+\.)*\w*(?:Error|Exception|Interrupt): (.+)$")


def one_line(exc: BaseException) -> str:
    """The line to print for ``exc``. An error raised in a data-loader worker reaches the
    main process as the same type with torch's wrapper text ("Caught X in DataLoader
    worker process 0", the worker's traceback): its own message is the traceback's
    ``Type: message`` line (gin may add lines after it)."""
    text = str(exc).strip()
    if _WORKER.match(text):
        raised = [m[1] for line in text.splitlines() if (m := _RAISED.match(line.strip()))]
        if raised:
            return raised[-1]
    return text.splitlines()[0] if text else type(exc).__name__
