"""safetensors files read and written one tensor at a time, with memory bounded by one tensor.

The `safetensors` package maps a whole file and hands out tensors backed by that mapping: every page a
caller touches stays resident (it counts in RSS) until the file is closed, so reading a shard tensor by
tensor grows RSS to the shard's size. And it writes a file only from a dict holding every tensor. A
streaming merge needs neither, nor does the first process of an --fsdp run handing each process its rows
of the checkpoint (pyprefopt.distributed), so this module reads each tensor, or a block of its rows, with
`readinto` into a buffer the caller may reuse, and writes the header first (every name, dtype and shape
is known in advance) and then each tensor's bytes as it is produced. The format
(https://github.com/huggingface/safetensors): an 8-byte little-endian header length, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}` padded with spaces to a
multiple of 8, then the byte buffer the offsets index.

A transformers checkpoint directory holds its weights in one such file or in shards an index maps tensor names to
(`checkpoint_weight_files`); `read_headers` reads the headers of all of them.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# A header larger than this is not a safetensors header (the reference implementation's own limit).
MAX_HEADER_BYTES = 100_000_000
# transformers' names for a checkpoint's weights: a single file, or the index of its shards.
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsFormatError(ValueError):
    """A file that is not valid safetensors, or a checkpoint directory whose weights are not a set of them; the
    message names the file and the problem."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, absolute byte offset, dtype and shape."""

    name: str
    path: Path
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """The tensors of a safetensors file (by name, in file order) and its `__metadata__`, checked
    against the file's size: a truncated or corrupt file fails here, before any tensor is read."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) != 8:
            raise SafetensorsFormatError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise SafetensorsFormatError(f"{path}: header length {header_len} does not fit a {size}-byte file")
        try:
            header = json.loads(f.read(header_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsFormatError(f"{path}: header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsFormatError(f"{path}: __metadata__ is not a JSON object")
    data_start = 8 + header_len
    entries = []
    for name, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        if not all(_is_size(n) for n in (*shape, begin, end)) or not isinstance(dtype_name, str):
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has a malformed header entry {info!r}")
        if dtype_name not in DTYPES:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}")
        entry = TensorEntry(name, path, data_start + begin, DTYPES[dtype_name], shape)
        if not 0 <= begin <= end or end - begin != entry.nbytes:
            raise SafetensorsFormatError(
                f"{path}: tensor {name!r} spans bytes [{begin}, {end}) "
                f"but {dtype_name}{list(shape)} needs {entry.nbytes}"
            )
        if data_start + end > size:
            raise SafetensorsFormatError(f"{path}: tensor {name!r} ends past the end of the file (truncated?)")
        entries.append(entry)
    entries.sort(key=lambda e: e.offset)
    return {e.name: e for e in entries}, metadata


def read_tensor(entry: TensorEntry, buffer: torch.Tensor | None = None,
                rows: range | None = None) -> torch.Tensor:
    """The tensor's bytes read from disk, in `buffer` (a uint8 CPU tensor of at least the bytes read,
    reused across calls to spare the page faults of a fresh allocation) or in a new tensor. `rows`: only
    those rows (a step-1 range of the first dimension's indices), which lie contiguous in the file: a
    tensor is read a block of rows at a time without ever being whole in memory."""
    shape, offset = entry.shape, entry.offset
    if rows is not None:
        if not shape or rows.step != 1 or not 0 <= rows.start <= rows.stop <= shape[0]:
            raise ValueError(f"rows {rows} are not a block of {entry.name!r}'s {list(shape)}")
        row_bytes = math.prod(shape[1:]) * entry.dtype.itemsize
        shape, offset = (len(rows), *shape[1:]), offset + rows.start * row_bytes
    nbytes = math.prod(shape) * entry.dtype.itemsize
    if buffer is None:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
    elif buffer.dtype != torch.uint8 or buffer.numel() < nbytes or not buffer.is_contiguous():
        raise ValueError(f"buffer must be contiguous uint8 with at least {nbytes} bytes")
    data = buffer[:nbytes]
    with open(entry.path, "rb") as f:
        f.seek(offset)
        view = memoryview(data.numpy())
        done = 0
        while done < nbytes:
            n = f.readinto(view[done:])
            if not n:
                raise SafetensorsFormatError(f"{entry.path}: tensor {entry.name!r} is cut short (file changed?)")
            done += n
    return data.view(entry.dtype).view(shape)


def read_headers(files: list[Path]) -> dict[str, TensorEntry]:
    """The tensors of one checkpoint's safetensors files by name, in file order, each file checked as `read_header`
    checks it; a missing file, or a tensor stored in two of them, is refused."""
    entries = {}
    for path in files:
        if not path.is_file():
            raise SafetensorsFormatError(f"missing weight file {path}")
        header, _ = read_header(path)
        for name in header.keys() & entries.keys():
            raise SafetensorsFormatError(f"tensor {name!r} is stored twice: in {entries[name].path} and {path}")
        entries.update(header)
    return entries


def checkpoint_weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a transformers checkpoint directory: those its index maps tensors to, each once in
    order of first mention, or its single file."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            contents = json.loads(index.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsFormatError(f"{index} is not valid JSON ({err})") from None
        weight_map = contents.get("weight_map") if isinstance(contents, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SafetensorsFormatError(f"{index} has no weight_map")
        for tensor, file_name in weight_map.items():
            if not isinstance(file_name, str) or not file_name:
                raise SafetensorsFormatError(f"{index}: weight_map[{tensor!r}] must be a file name, got {file_name!r}")
        return [directory / name for name in dict.fromkeys(weight_map.values())]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    if any(directory.glob("*.bin")):
        raise SafetensorsFormatError(f"{directory} holds only .bin weights; save it with safe_serialization=True")
    raise SafetensorsFormatError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}")


def checkpoint_entries(directory: Path) -> dict[str, TensorEntry]:
    """Where each tensor of a safetensors checkpoint directory lies, in file order (read from the file headers
    alone)."""
    return read_headers(checkpoint_weight_files(directory))


def checkpoint_tensor_names(directory: Path) -> list[str]:
    """The names of the tensors a safetensors checkpoint directory holds (read from the file headers alone)."""
    return list(checkpoint_entries(directory))


class StreamingWriter:
    """Writes a safetensors file whose tensors are all declared up front and then written one by one,
    in the declared order, each straight from the caller's buffer."""

    def __init__(self, path: str | os.PathLike, layout: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        header = {"__metadata__": dict(metadata or {"format": "pt"})}
        offset = 0
        self._pending = []
        for name, dtype, shape in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self._pending.append((name, dtype, tuple(shape)))
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the data must start 8-byte aligned
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self._pending.reverse()

    def write(self, name: str, tensor: torch.Tensor):
        expected_name, dtype, shape = self._pending.pop()
        if (name, tensor.dtype, tuple(tensor.shape)) != (expected_name, dtype, shape):
            raise ValueError(
                f"{self.path}: expected {expected_name} {dtype}{list(shape)} next, got {name} "
                f"{tensor.dtype}{list(tensor.shape)}"
            )
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        self._file.write(memoryview(flat.view(torch.uint8).numpy()))

    def close(self):
        """Flush and fsync; every declared tensor must have been written."""
        if self._pending:
            self._file.close()
            raise ValueError(f"{self.path}: {len(self._pending)} declared tensors were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
