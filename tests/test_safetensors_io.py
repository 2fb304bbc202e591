"""`pyprefopt.safetensors_io.read_tensor`: a tensor read whole, or a block of its rows alone (what the first process
of an --fsdp run sends each process), bit for bit what the safetensors package reads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from pyprefopt.safetensors_io import read_header, read_tensor


def test_a_block_of_rows_is_read_alone_and_is_the_tensors_rows(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {"embed": torch.randn(7, 3, 2, generator=generator).bfloat16(), "scale": torch.tensor(2.5),
               "bias": torch.arange(5, dtype=torch.int32)}
    save_file(tensors, tmp_path / "model.safetensors")
    entries, _ = read_header(tmp_path / "model.safetensors")
    for name, tensor in tensors.items():
        assert torch.equal(read_tensor(entries[name]), tensor), name
    for rows in (range(0, 4), range(4, 7), range(6, 7), range(7, 7)):
        got = read_tensor(entries["embed"], rows=rows)
        assert got.shape == (len(rows), 3, 2) and torch.equal(got, tensors["embed"][rows.start:rows.stop]), rows
    buffer = torch.empty(entries["embed"].nbytes, dtype=torch.uint8)
    assert torch.equal(read_tensor(entries["embed"], buffer, range(2, 5)), tensors["embed"][2:5])
    for rows in (range(5, 8), range(0, 4, 2), range(3, 1)):
        with pytest.raises(ValueError, match="are not a block"):
            read_tensor(entries["embed"], rows=rows)
    with pytest.raises(ValueError, match="are not a block"):
        read_tensor(entries["scale"], rows=range(0, 1))
