"""The one domain exception of biasscope.

Library code raises :class:`BiasscopeError` for bad usage or bad input; only the CLI turns it
into a one-line message and exit code 2.
"""


class BiasscopeError(ValueError):
    """Bad usage or bad input: the message says what and where, in one line."""
