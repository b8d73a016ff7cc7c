"""Read and write SegViz model files (``.segviz``), byte for byte as ``segviz-core`` does.

The layout (see ``segviz-core/src/checkpoint.rs``)::

    b"SEGVIZ\\0\\x01"        magic and format version 1
    u64 little-endian         length of the JSON header
    JSON header               {"config": ..., "metadata": ..., "tensors": [{"path", "shape",
                              "role", "batch_norm", "trainable"}, ...]}
    f32 little-endian values  every tensor in header order
    u64 little-endian         FNV-1a-64 checksum of every byte above

Tensors are written sorted by path in byte order (the order of Rust's ``BTreeMap<String, _>``).
A tensor's *role* is ``"representation"`` or ``{"head": "<task>"}``; together with
``batch_norm`` and ``trainable`` it forms the tensor's *classification*, decided in Rust from
the model's module structure and never guessed here from a name.

Every error is a :class:`SegVizFormatError` whose message names the file.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

MAGIC = b"SEGVIZ\0\x01"
"""The first eight bytes of every SegViz model file (format version 1)."""

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK64 = (1 << 64) - 1


class SegVizFormatError(ValueError):
    """A SegViz model file (or a classification) that cannot be read or written."""


def fnv1a64(data: bytes) -> int:
    """FNV-1a 64-bit hash of ``data``, the checksum of ``.segviz`` files.

    A plain byte loop with local names: about 60 ns per byte on CPython 3.11, so a model of a
    million float32 values (4 MB) is checked in a quarter of a second.
    """
    h = FNV_OFFSET
    prime = FNV_PRIME
    mask = _MASK64
    for byte in data:
        h = ((h ^ byte) * prime) & mask
    return h


@dataclass(frozen=True)
class TensorClass:
    """The classification of one tensor: which part of the model it belongs to.

    ``task`` is ``None`` for the shared representation block, else the name of the task whose
    head owns the tensor. ``batch_norm`` marks tensors owned by a BatchNorm layer (weight,
    bias, running statistics); ``trainable`` is false for running statistics.
    """

    task: str | None
    batch_norm: bool
    trainable: bool

    @property
    def is_head(self) -> bool:
        """Whether the tensor belongs to a task head."""
        return self.task is not None

    @property
    def is_representation(self) -> bool:
        """Whether the tensor belongs to the shared representation block."""
        return self.task is None

    def role_json(self) -> Any:
        """The role as serde writes Rust's ``TensorRole``: ``"representation"`` or
        ``{"head": task}``."""
        return "representation" if self.task is None else {"head": self.task}

    def to_json(self) -> dict[str, Any]:
        """The classification entry of the Flower ``segviz`` record for this tensor."""
        return {"role": self.role_json(), "batch_norm": self.batch_norm, "trainable": self.trainable}

    @classmethod
    def from_json(cls, role: Any, batch_norm: Any, trainable: Any, where: str) -> "TensorClass":
        """Parses a role and the two flags; ``where`` names the tensor in error messages."""
        if role == "representation":
            task = None
        elif (
            isinstance(role, dict)
            and list(role) == ["head"]
            and isinstance(role["head"], str)
            and role["head"]
        ):
            task = role["head"]
        else:
            raise SegVizFormatError(
                f"{where}: role must be \"representation\" or {{\"head\": \"<task>\"}}, got {role!r}"
            )
        if not isinstance(batch_norm, bool) or not isinstance(trainable, bool):
            raise SegVizFormatError(
                f"{where}: batch_norm and trainable must be booleans, got "
                f"{batch_norm!r} and {trainable!r}"
            )
        return cls(task, batch_norm, trainable)


@dataclass
class Tensor:
    """One tensor: float32 values in C order, with its classification."""

    data: np.ndarray
    cls: TensorClass

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data, dtype=np.float32, order="C")


@dataclass
class Checkpoint:
    """The content of a ``.segviz`` file.

    ``config`` is the model configuration (``SegVizConfig`` as JSON), kept as read and
    written back unchanged; ``metadata`` is whatever the writer attached; ``tensors`` maps
    each parameter path to its tensor.
    """

    config: dict[str, Any]
    metadata: Any = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)


def sorted_paths(paths: Iterable[str]) -> list[str]:
    """Paths in Rust ``BTreeMap<String, _>`` order: by their UTF-8 bytes."""
    return sorted(paths, key=lambda p: p.encode("utf-8"))



def encode_checkpoint(checkpoint: Checkpoint) -> bytes:
    """The bytes of a ``.segviz`` file holding ``checkpoint``."""
    paths = sorted_paths(checkpoint.tensors)
    header = {
        "config": checkpoint.config,
        "metadata": checkpoint.metadata,
        "tensors": [
            {
                "path": p,
                "shape": [int(d) for d in checkpoint.tensors[p].data.shape],
                "role": checkpoint.tensors[p].cls.role_json(),
                "batch_norm": checkpoint.tensors[p].cls.batch_norm,
                "trainable": checkpoint.tensors[p].cls.trainable,
            }
            for p in paths
        ],
    }
    # serde_json's compact form: no spaces, non-ASCII kept as UTF-8.
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
        "utf-8"
    )
    parts = [MAGIC, struct.pack("<Q", len(header_bytes)), header_bytes]
    for p in paths:
        parts.append(np.asarray(checkpoint.tensors[p].data, dtype="<f4", order="C").tobytes())
    body = b"".join(parts)
    return body + struct.pack("<Q", fnv1a64(body))


def decode_checkpoint(data: bytes, name: str = "<bytes>") -> Checkpoint:
    """Parses the bytes of a ``.segviz`` file; ``name`` identifies it in error messages."""

    def bad(reason: str) -> SegVizFormatError:
        return SegVizFormatError(f"{name}: {reason}")

    if len(data) < len(MAGIC) + 16 or data[: len(MAGIC)] != MAGIC:
        raise bad("not a SegViz model file (bad magic or too short)")
    body, tail = data[:-8], data[-8:]
    (stored,) = struct.unpack("<Q", tail)
    if fnv1a64(body) != stored:
        raise bad("checksum mismatch: the file is truncated or corrupted")
    (header_len,) = struct.unpack("<Q", body[8:16])
    data_start = 16 + header_len
    if data_start > len(body):
        raise bad("header length runs past the end of the file")
    try:
        header = json.loads(body[16:data_start].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"malformed header: {e}") from None
    if not isinstance(header, dict) or not {"config", "metadata", "tensors"} <= header.keys():
        raise bad("malformed header: expected an object with config, metadata and tensors")
    if not isinstance(header["config"], dict):
        raise bad("malformed header: config must be an object")
    if not isinstance(header["tensors"], list):
        raise bad("malformed header: tensors must be a list")

    offset = data_start
    tensors: dict[str, Tensor] = {}
    for i, t in enumerate(header["tensors"]):
        if not isinstance(t, dict) or not {"path", "shape", "role", "batch_norm", "trainable"} <= t.keys():
            raise bad(f"malformed header: tensor entry {i} lacks path, shape, role, batch_norm or trainable")
        path, shape = t["path"], t["shape"]
        if not isinstance(path, str) or not path:
            raise bad(f"malformed header: tensor entry {i} has no path")
        if path in tensors:
            raise bad(f"tensor {path} appears twice in the header")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise bad(f"tensor {path}: shape must be a list of non-negative integers, got {shape!r}")
        try:
            cls = TensorClass.from_json(t["role"], t["batch_norm"], t["trainable"], f"tensor {path}")
        except SegVizFormatError as e:
            raise bad(str(e)) from None
        n = 1
        for d in shape:
            n *= d
        end = offset + 4 * n
        if end > len(body):
            raise bad(f"tensor {path} runs past the end of the file")
        values = np.frombuffer(body, dtype="<f4", count=n, offset=offset).astype(np.float32)
        tensors[path] = Tensor(values.reshape(shape), cls)
        offset = end
    if offset != len(body):
        raise bad(f"{len(body) - offset} unexpected bytes after the last tensor")
    return Checkpoint(config=header["config"], metadata=header["metadata"], tensors=tensors)


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Reads a ``.segviz`` file; a missing, truncated or corrupted file raises
    :class:`SegVizFormatError` naming it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SegVizFormatError(f"{path}: cannot read: {e.strerror or e}") from None
    return decode_checkpoint(data, str(path))


def write_atomically(path: str | os.PathLike[str], data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder, flushed to
    disk and renamed over ``path``: a reader never sees a half-written file."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=folder)
    except OSError as e:
        raise SegVizFormatError(f"{path}: cannot write: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise SegVizFormatError(f"{path}: cannot write: {e.strerror or e}") from None
    try:  # make the rename itself durable; not every file system allows this
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def write_checkpoint(path: str | os.PathLike[str], checkpoint: Checkpoint) -> None:
    """Writes ``checkpoint`` to ``path`` atomically in the ``.segviz`` format."""
    try:
        data = encode_checkpoint(checkpoint)
    except (TypeError, ValueError) as e:
        raise SegVizFormatError(f"{path}: cannot encode: {e}") from None
    write_atomically(path, data)


def classification_to_json(tensors: Mapping[str, Tensor]) -> str:
    """The ``classification`` string of the Flower ``segviz`` record (docs/flower.md): a JSON
    object, path -> {"role", "batch_norm", "trainable"}, keys in path order."""
    return json.dumps(
        {p: tensors[p].cls.to_json() for p in sorted_paths(tensors)}, separators=(",", ":")
    )


def classification_from_json(text: str, where: str) -> dict[str, TensorClass]:
    """Parses a ``classification`` string; ``where`` names its sender in error messages."""
    try:
        raw = json.loads(text)
    except (TypeError, json.JSONDecodeError) as e:
        raise SegVizFormatError(f"{where}: classification is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise SegVizFormatError(f"{where}: classification must be a JSON object (path -> entry)")
    out: dict[str, TensorClass] = {}
    for path, entry in raw.items():
        if not isinstance(entry, dict) or not {"role", "batch_norm", "trainable"} <= entry.keys():
            raise SegVizFormatError(
                f"{where}: classification of {path} must have role, batch_norm and trainable"
            )
        out[path] = TensorClass.from_json(
            entry["role"], entry["batch_norm"], entry["trainable"], f"{where}: tensor {path}"
        )
    return out
