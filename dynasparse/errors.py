"""The one exception type users catch: every message names what was wrong and what to do."""


class DynasparseError(ValueError):
    """Bad input to dynasparse: the message says what was wrong and how to fix it."""
