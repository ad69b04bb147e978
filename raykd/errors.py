"""The one exception type that means "the user asked for something we cannot do".

The CLI prints these as a one-line error and exits non-zero; anything else is a bug and keeps
its traceback.
"""


class RaykdError(Exception):
    pass
