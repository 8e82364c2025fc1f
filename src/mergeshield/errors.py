"""The one error type mergeshield raises for bad input: its message is a single line."""


class MergeShieldError(Exception):
    """Bad input or a failed check; ``str(err)`` is a one-line message for the user."""
