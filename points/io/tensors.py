"""Reading safetensors checkpoints: `TensorFiles` (one `model.safetensors`, or an index and its shards) and
`forget_pages` (drop a memory map's pages once their bytes were copied).

safetensors' own reader (`safe_open`) maps every file; a tensor is handed out as a view of its file's map,
nothing read until it is used. Every header is read and validated when the directory is opened (names,
shapes, dtypes, truncation, an index that lists a tensor its shard lacks), before any tensor data.
"""

from __future__ import annotations

import ctypes
import json
import mmap
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from points.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class TensorFiles:
    """The tensors of a checkpoint directory (one `model.safetensors`, or an index and its shards), read
    through safetensors' `safe_open`: every header is read and validated at once (names, shapes, dtypes,
    truncation). `get` returns a tensor as a view of its file's memory map, without copying."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index (needs a 'weight_map'): {e}") from None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index}: 'weight_map' must be an object mapping tensor names to file "
                                      "names")
            files = sorted(set(weight_map.values()))
        elif (self.directory / SINGLE).is_file():
            weight_map, files = {}, [SINGLE]
        else:
            raise CheckpointError(f"{self.directory}: no {SINGLE} or {INDEX} found")
        self._open = {}  # file -> safe_open handle (holds the file's map)
        self._file = {}  # tensor name -> file
        for f in files:
            path = self.directory / f
            if not path.is_file():
                raise CheckpointError(f"{path}: shard listed in {index.name} is missing")
            try:
                self._open[f] = safe_open(str(path), framework="pt")
            except SafetensorError as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e}); "
                                      "is it truncated or still downloading?") from None
            self._file.update(dict.fromkeys(self._open[f].keys(), f))
        for name, f in weight_map.items():
            if self._file.get(name) != f:
                raise CheckpointError(f"{self.directory / f}: tensor {name} is listed there by {INDEX} "
                                      "but the shard does not hold it")

    @property
    def names(self) -> set[str]:
        return set(self._file)

    def _slice(self, name: str):
        return self._open[self._file[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        return self._slice(name).get_dtype()

    def dtype(self, name: str) -> torch.dtype | None:
        """The torch dtype of a floating tensor; None for any other (integer, bool, fp8) tensor."""
        return _SAFETENSORS_DTYPES.get(self.dtype_name(name))

    def get(self, name: str) -> torch.Tensor:
        """The tensor, a view of its file's memory map (nothing is read until it is used)."""
        return self._open[self._file[name]].get_tensor(name)

    def where(self, name: str) -> Path:
        return self.directory / self._file[name]

    def file_of(self, name: str) -> str:
        return self._file[name]

    def metadata(self, file: str) -> dict[str, str] | None:
        """The `__metadata__` of one of the files (e.g. {"format": "pt"})."""
        return self._open[file].metadata()

    def release(self, file: str) -> None:
        """Let go of a file's handle (its map lives on only as long as a tensor views it)."""
        self._open.pop(file, None)


def forget_pages(t: torch.Tensor) -> None:
    """`t` is a view of a file's memory map whose bytes have been copied and will not be read again: drop the
    map's pages that lie wholly inside it, so that they stop counting as this process's resident memory
    (the file is untouched; a later read would fault them in again). A no-op where madvise is unavailable."""
    lo = -(-t.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = (t.data_ptr() + t.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo and _madvise is not None:
        _madvise(lo, hi - lo, mmap.MADV_DONTNEED)


def _libc_madvise():
    try:
        fn = ctypes.CDLL(None).madvise
    except (OSError, AttributeError, TypeError):
        return None
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_madvise = _libc_madvise()
