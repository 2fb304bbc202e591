"""The train CLI's error for what its user can fix, shared by pyprefopt.train and the modules it is built from."""

from __future__ import annotations


class RunError(Exception):
    """A problem the user can fix (an option, a file, the output directory): main() prints `error: <message>` and
    exits with status 2, having written nothing that a corrected rerun would trip over."""
