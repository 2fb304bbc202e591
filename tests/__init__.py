"""pyprefopt's tests: a package, so that they import their helpers as `tests.NAME` and the processes they start run
their workers as `python -m tests.NAME` from the repository root."""
