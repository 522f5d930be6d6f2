"""The one exception type users see: a one-line message naming the input and the fix."""


class SfedgeError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits 1 (2 for usage errors)."""


class UsageError(SfedgeError):
    """A bad argument or option value (CLI exit code 2)."""


def env_switch(name: str, values: tuple) -> str:
    """The value of an opt-in environment switch: "" when unset or empty, else one of ``values`` (case and
    surrounding spaces ignored); any other value is a UsageError naming the variable, not a silent default."""
    import os

    value = os.environ.get(name, "").strip().lower()
    if value and value not in values:
        raise UsageError(f"environment variable {name}={os.environ[name]!r} is not understood: "
                         f"use {' or '.join(repr(v) for v in values)}, or unset it")
    return value
