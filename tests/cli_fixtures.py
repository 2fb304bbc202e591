"""Fixtures and checks of the tests that run the train CLI in-process: one thread and a private model cache per
test module (the embedded default model is built there, not in the user's cache), a small synthetic data set, and
the check that a refused run says one error line and writes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pyprefopt import train
from tests.synthetic_data import write_data


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_private_cache(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYPREFOPT_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_data(root, n_train=32, n_test=8)
    return root


def assert_refused_before_writing(argv, tmp_path, capsys, expected):
    """`python -m pyprefopt.train argv` exits with status 2 and one `error: ...` line holding `expected`, and has
    written or changed nothing under `tmp_path` (the output directory included)."""
    output_dir = argv[argv.index("--output-dir") + 1]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    try:
        status = train.main(argv)
    except SystemExit as e:  # argparse's checks exit from parse_args
        status = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "a refused run wrote or changed files"
    assert not Path(output_dir).exists()
