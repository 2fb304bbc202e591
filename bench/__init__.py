"""pyprefopt's benchmarks: a package, run from the repository root as `python -m bench.NAME`, importing their helpers
as `bench.NAME` (and the synthetic data of the tests as `tests.synthetic_data`)."""
