"""The one domain exception of biasscope.

Library code raises :class:`BiasscopeError` for bad usage or bad input; only the CLI turns it
into a one-line message and exit code 2.
"""


class BiasscopeError(ValueError):
    """Bad usage or bad input: the message says what and where, in one line."""


class ScanInterrupted(KeyboardInterrupt):
    """Ctrl-C during a scan: how much of it is stored, for the CLI's resume hint."""

    def __init__(self, stored: int, total: int, out):
        super().__init__(f"interrupted: {stored:,} of {total:,} images stored; "
                         "run the same command again to resume")
        self.stored, self.total, self.out = int(stored), int(total), out
