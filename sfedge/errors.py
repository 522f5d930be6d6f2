"""The one exception type users see: a one-line message naming the input and the fix."""


class SfedgeError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits 1 (2 for usage errors)."""


class UsageError(SfedgeError):
    """A bad argument or option value (CLI exit code 2)."""
