"""safetensors files, read and written in bounded memory: the one reader and writer that HF
directories and megamoe's model-only checkpoints (weights.py) share.

Reading: the header is parsed once; a tensor, or rows [a, b) of its first dim, is read with
positioned reads into a fresh tensor. Memory then holds exactly what was asked for: with an mmap
(safetensors.safe_open) every page touched stays in the process's RSS until the file is closed,
so a conversion that walks a whole checkpoint would end up holding all of it. `bytes_read`
counts what was read (tests use it to show a rank reads only its slices).
Writing: `ShardWriter.add(name, tensor)` buffers tensors up to a size budget and writes each full
shard at once, header then every tensor's bytes straight from its storage
(safetensors.torch.save_file first copies every tensor into a bytes object: twice the shard).
Files are written under temporary names and renamed by `finish()`, once the count is known.
A failed write (disk full, quota) is one line naming the file (files.writing).
"""

from __future__ import annotations

import json
import os
import struct

import torch

from megamoe.checkpoint.files import writing

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
          "F8_E5M2": torch.float8_e5m2}
CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20     # safetensors' own limit
_LIBC = None


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc malloc_trim). Tensors below glibc's mmap
    threshold (up to 32 MB) come from the heap, and a heap fragmented by one layer's tensors
    keeps its peak: streaming code calls this between layers and after each shard."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


class SafetensorsFile:
    """Lazy reader of one .safetensors file (no mmap; see the module docstring)."""

    def __init__(self, path: str):
        self.path = path
        self.bytes_read = 0
        self.largest_read = 0
        size = os.path.getsize(path)
        self._f = open(path, "rb", buffering=0)
        try:
            head = self._f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise ValueError("no valid header")
            header = json.loads(self._f.read(n))
        except (ValueError, struct.error, UnicodeDecodeError) as err:
            self.close()
            raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt: "
                             f"{err})") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + n
        self.entries = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self._base + end > size:
            self.close()
            raise ValueError(f"{path} is truncated: {size} bytes, its header describes "
                             f"{self._base + end}")
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                self.close()
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.entries[name]["dtype"]]

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `name`, or rows [a, b) of its first dim, as a new tensor."""
        e = self.entries[name]
        shape, dtype = list(e["shape"]), DTYPES[e["dtype"]]
        start = e["data_offsets"][0]
        if rows is not None and shape:
            a, b = rows
            row_bytes = (e["data_offsets"][1] - start) // max(shape[0], 1)
            start += a * row_bytes
            shape[0] = b - a
        out = torch.empty(shape, dtype=dtype)
        if out.numel():
            buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            got, pos = 0, self._base + start
            while got < len(buf):
                n = os.preadv(self._f.fileno(), [buf[got:]], pos + got)
                if not n:
                    raise ValueError(f"{self.path} is truncated (reading {name!r})")
                got += n
            self.bytes_read += got
            self.largest_read = max(self.largest_read, got)
        return out

    def close(self) -> None:
        self._f.close()


def _raw(t: torch.Tensor):
    """The bytes of a contiguous tensor, without a copy."""
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


def write_file(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """One safetensors file (loadable by the safetensors package and transformers), fsynced."""
    header, off = {}, 0
    for name, t in tensors.items():
        if t.dtype not in CODES:
            raise ValueError(f"cannot store {name!r} of dtype {t.dtype} in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)        # aligned data, as safetensors pads
    with writing(path), open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            f.write(_raw(t))
        f.flush()
        os.fsync(f.fileno())


class ShardWriter:
    """Stream tensors into `prefix`.safetensors, or `prefix`-0000i-of-0000n.safetensors when they
    exceed `max_bytes` (a shard closes when the next tensor would overflow it; one tensor larger
    than the limit gets a shard of its own). Holds at most one shard."""

    def __init__(self, directory: str, max_bytes: int, prefix: str = "model",
                 metadata: dict | None = None):
        self.dir, self.max_bytes, self.prefix, self.metadata = directory, max_bytes, prefix, metadata
        self._pending: dict[str, torch.Tensor] = {}
        self._size = 0
        self._written: list[list[str]] = []          # names per written shard
        self.total_size = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()     # a view into a bigger storage (an mmap'd file) would keep it alive
        nbytes = t.numel() * t.element_size()
        if self._pending and self._size + nbytes > self.max_bytes:
            self._flush()
        self._pending[name] = t
        self._size += nbytes
        self.total_size += nbytes

    def _tmp_name(self, i: int) -> str:
        return f".{self.prefix}-{i + 1:05d}.safetensors.partial"

    def _flush(self) -> None:
        write_file(os.path.join(self.dir, self._tmp_name(len(self._written))), self._pending,
                   self.metadata)
        self._written.append(list(self._pending))
        self._pending, self._size = {}, 0
        trim_heap()

    def finish(self) -> dict[str, str]:
        """Write the last shard, give every file its final name; {tensor name: file name}."""
        if self._pending or not self._written:
            self._flush()
        n = len(self._written)
        where = {}
        for i, names in enumerate(self._written):
            final = f"{self.prefix}.safetensors" if n == 1 else \
                f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(os.path.join(self.dir, self._tmp_name(i)), os.path.join(self.dir, final))
            where.update((k, final) for k in names)
        return where


__all__ = ["DTYPES", "CODES", "SafetensorsFile", "write_file", "ShardWriter", "trim_heap"]
