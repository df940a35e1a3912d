"""Writing files so that nothing is half-written: directories built in a hidden sibling, files renamed
into place, shards with the reader's usual permissions, one-line errors for a full disk.

    with partial_dir(dst) as tmp:          # a hidden sibling `.NAME.partial-PID`
        ...write into tmp...                 # save_tensors(tensors, tmp / "x.safetensors")
        os.rename(tmp, dst)

On any failure the sibling is removed, SIGTERM included (while the block runs, SIGTERM is turned into
`Terminated`, an exception, so that the cleanup runs; the earlier handler is restored afterwards). Siblings
left by processes that no longer exist (SIGKILL, a power cut) are removed when the next one starts, for any
destination in the same folder. `save_tensors` writes a safetensors file with the mode the process umask
gives new files (safetensors' own writer leaves 0600) and turns a failed write (a full disk) into a
`WriteError` naming the file; `stream_tensors` writes one piece by piece, never holding it whole.
`write_text_atomically` replaces a file whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import struct
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from points.errors import Terminated, WriteError

if TYPE_CHECKING:  # (torch is imported where tensors are written: the command line reads this module first)
    import torch


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(dst: Path) -> list[Path]:
    """Remove the `.NAME.partial-PID` folders beside `dst` (any NAME) whose process is gone; return them."""
    pattern = re.compile(r"\..+\.partial-(\d+)")
    removed = []
    try:
        siblings = list(dst.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink() and int(m[1]) != os.getpid() and not _alive(int(m[1])):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum}")


@contextmanager
def sigterm_raises():
    """While the block runs (in the main thread), SIGTERM raises `Terminated`, so that cleanups run."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        yield
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def partial_dir(dst: Path):
    dst = Path(dst)
    remove_stale_partials(dst)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    with sigterm_raises():
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask sets it, which races with other threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open()` gives a new file under the process umask (0644 under the usual 022)."""
    return 0o666 & ~_umask()


def save_tensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file` with the umask's file mode; a failed write raises `WriteError`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
        os.chmod(path, file_mode())
    except (OSError, SafetensorError) as e:
        raise WriteError(path, e) from None


@contextmanager
def writing(path: Path):
    """An OSError raised while the block writes `path` becomes a `WriteError` naming it."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        raise WriteError(path, e) from None


MAX_SHARD_BYTES = 5 * 10**9  # the largest shard the writers make (points convert --max-shard-gb)


def shard_name(i: int, count: int) -> str:
    return f"model-{i + 1:05d}-of-{count:05d}.safetensors"


def write_shards(shards: Iterable[dict], folder: Path, count: int | None = None,
                 metadata: dict[str, str] | None = None) -> dict[str, str]:
    """The one shard writer (convert, the random checkpoints, the tests' reference checkpoints): each dict of
    tensors as one safetensors file `model-0000i-of-0000n` in `folder`, produced and written one at a time;
    returns the weight map (tensor name -> file). With `count` unknown the files are written under part names
    and renamed once the last is written."""
    names, folder = [], Path(folder)
    for i, tensors in enumerate(shards):
        save_tensors(tensors, folder / (shard_name(i, count) if count else f".part-{i}.safetensors"), metadata)
        names.append(list(tensors))
    if count is not None and count != len(names):
        raise ValueError(f"write_shards: {len(names)} shards written, {count} announced")
    weight_map = {}
    for i, part in enumerate(names):
        final = shard_name(i, len(names))
        if count is None:
            with writing(folder / final):
                os.rename(folder / f".part-{i}.safetensors", folder / final)
        weight_map.update(dict.fromkeys(part, final))
    return weight_map


def by_size(named: Iterable[tuple[str, object]], max_bytes: int) -> Iterator[dict]:
    """(name, tensor) pairs -> dicts of at most `max_bytes` of tensors (a larger tensor is a shard alone)."""
    shard, size = {}, 0
    for name, t in named:
        n = t.numel() * t.element_size()
        if shard and size + n > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name], size = t, size + n
    if shard:
        yield shard


# the safetensors names of the dtypes the stream writer writes (torch.float32 -> "float32" -> "F32")
SAFETENSORS_DTYPE = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int8": "I8",
                     "int32": "I32", "int64": "I64", "uint8": "U8", "bool": "BOOL"}


def stream_tensors(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]], pieces: Iterable[torch.Tensor],
                   metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written as its tensors are made, so that only the piece at hand is in memory: the
    header from `specs` (name, dtype, shape; the tensors in that order), then `pieces` (each a tensor of its
    tensor's dtype: its rows, in order, covering every tensor of `specs` exactly). A failed write, or pieces
    that do not add up, raise (WriteError / ValueError) and leave a file the caller discards."""
    import torch

    header, offset = {}, 0
    for name, dtype, shape in specs:
        n = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPE[str(dtype).removeprefix("torch.")], "shape": list(shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    written = 0
    with writing(path), open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for piece in pieces:
            data = piece.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(data)
            written += data.nbytes
        if written != offset:
            raise ValueError(f"stream_tensors: {written} bytes given for {path}, {offset} announced by the header")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, file_mode())


def write_text_atomically(path: Path, text: str) -> None:
    """`path` replaced whole (written under a temporary name, fsynced, renamed) or left as it was; a failed
    write raises `WriteError`."""
    write_bytes_atomically(path, text.encode("utf-8"))


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """As `write_text_atomically`, for bytes."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(path, e) from None
    finally:
        tmp.unlink(missing_ok=True)
