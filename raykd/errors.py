"""The one exception type that means "the user asked for something we cannot do", and the one
way an exception is told in a single line.

The CLI prints these as a one-line error and exits non-zero; anything else is a bug and keeps
its traceback.
"""

LIMIT = 300   # characters of a message worth quoting: a value in an error is never megabytes


class RaykdError(Exception):
    pass


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (a job scheduler or `kill` stops raykd the same way)."""


def one_line(exc: BaseException, *, first: bool = False, typed: bool = False,
             limit: int = LIMIT) -> str:
    """`exc` in one line: the last non-empty line of its message (where a wrapped error or a
    traceback ends), or the `first` one; `typed`: as "TypeName: line". A line longer than
    `limit` characters is cut there and ends in "…". A message with no text gives the type
    name alone."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[0] if first else lines[-1]
    if len(line) > limit:
        line = line[:limit] + "…"
    return f"{type(exc).__name__}: {line}" if typed else line


# what a full disk looks like from Python (errno 28) and from torch.save's zip writer
_NO_SPACE = ("No space left on device", "[Errno 28]", "unexpected pos")


def out_of_space(error: BaseException | str) -> bool:
    """Whether an error (or a failed run's one-line reason) is a full disk."""
    import errno

    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    return any(mark in str(error) for mark in _NO_SPACE)
