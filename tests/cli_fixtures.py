"""Fixtures of the tests that run the train CLI in-process: one thread and a private model cache per test module
(the embedded default model is built there, not in the user's cache), and a small synthetic data set."""

from __future__ import annotations

import pytest
import torch

from synthetic_data import write_data


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
