"""Errors of the kernel lab."""


class LabError(RuntimeError):
    """The lab could not build or boot its kernel; the message says what failed and where to look."""
