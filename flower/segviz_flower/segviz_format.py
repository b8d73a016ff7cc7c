"""Read and write SegViz model files: safetensors files with SegViz metadata.

Model files are read and written by the ``safetensors`` package; this module only adds what
SegViz stores in the file's ``__metadata__`` (see ``segviz-core/src/checkpoint.rs``), each
value a JSON string:

``format``          ``"segviz"``
``format_version``  ``"2"``
``config``          the model configuration (``SegVizConfig``)
``tensors``         ``[{"path", "role", "batch_norm", "trainable", "crc32"}, ...]`` in path
                    order: each tensor's classification and the CRC-32 of its bytes
``metadata``        whatever the writer attached
``preprocess``      a copy of ``metadata["preprocess"]`` when there is one

Tensors are float32, named by their SegViz path. A tensor's *role* is ``"representation"``
or ``{"head": "<task>"}``; together with ``batch_norm`` and ``trainable`` it forms the
tensor's *classification*, decided in Rust from the model's module structure and never
guessed here from a name.

Files of the first SegViz format (magic ``SEGVIZ\\0\\x01``) are refused here with a pointer
to ``cargo run --release --example upgrade_model``, which rewrites them in this format.

Every error is a :class:`SegVizFormatError` whose message names the file.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import safetensors
import safetensors.numpy

FORMAT = "segviz"
"""The ``format`` metadata value of SegViz model files."""

FORMAT_VERSION = "2"
"""The ``format_version`` metadata value this module reads and writes."""

LEGACY_MAGIC = b"SEGVIZ\0\x01"
"""The first eight bytes of a file of the first SegViz format (no longer read here)."""


class SegVizFormatError(ValueError):
    """A SegViz model file (or a classification) that cannot be read or written."""


def _json(value: Any) -> str:
    """Compact JSON, as serde_json writes it."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


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

    def to_json_entry(self, path: str) -> dict[str, Any]:
        """The entry of this tensor in a model file's ``tensors`` list (without its CRC)."""
        return {"path": path, **self.to_json()}

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
    """The content of a SegViz model file.

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
    """The bytes of a SegViz model file holding ``checkpoint``."""
    arrays = {}
    entries = []
    for p in sorted_paths(checkpoint.tensors):
        t = checkpoint.tensors[p]
        data = np.require(t.data, dtype="<f4", requirements="C")  # keeps 0-d shapes
        arrays[p] = data
        entries.append({**t.cls.to_json_entry(p), "crc32": zlib.crc32(data.tobytes())})
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": _json(checkpoint.config),
        "tensors": _json(entries),
        "metadata": _json(checkpoint.metadata),
    }
    if isinstance(checkpoint.metadata, dict) and "preprocess" in checkpoint.metadata:
        metadata["preprocess"] = _json(checkpoint.metadata["preprocess"])
    return safetensors.numpy.save(arrays, metadata=metadata)


def _metadata_of(data: bytes) -> dict[str, str] | None:
    """The ``__metadata__`` of safetensors bytes that the ``safetensors`` package has already
    accepted (an 8-byte little-endian length, then the JSON header)."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n].decode("utf-8")).get("__metadata__")


def decode_checkpoint(data: bytes, name: str = "<bytes>") -> Checkpoint:
    """Parses the bytes of a SegViz model file; ``name`` identifies it in error messages."""

    def bad(reason: str) -> SegVizFormatError:
        return SegVizFormatError(f"{name}: {reason}")

    if data[:8] == LEGACY_MAGIC:
        raise bad(
            "a model file of the first SegViz format; rewrite it as safetensors with "
            "`cargo run --release --example upgrade_model -- FILE`"
        )
    try:
        arrays = safetensors.numpy.load(data)
    except Exception as e:  # the package raises SafetensorError and others
        raise bad(f"not a SegViz model file (safetensors: {e}); is it truncated or corrupted?") from None
    meta = _metadata_of(data) or {}

    def field_(key: str) -> str:
        if key not in meta:
            raise bad(f"a safetensors file without the SegViz metadata key {key!r}: not a SegViz model file")
        return meta[key]

    if field_("format") != FORMAT:
        raise bad(f"metadata format is {field_('format')!r}, not {FORMAT!r}: not a SegViz model file")
    if field_("format_version") != FORMAT_VERSION:
        raise bad(f"SegViz format version {field_('format_version')!r}; this reads version {FORMAT_VERSION}")

    def parse(key: str) -> Any:
        try:
            return json.loads(field_(key))
        except json.JSONDecodeError as e:
            raise bad(f"malformed metadata {key!r}: {e}") from None

    config, entries, metadata = parse("config"), parse("tensors"), parse("metadata")
    if not isinstance(config, dict):
        raise bad("malformed metadata 'config': must be an object")
    if not isinstance(entries, list):
        raise bad("malformed metadata 'tensors': must be a list")
    if len(entries) != len(arrays):
        raise bad(f"the metadata lists {len(entries)} tensors but the file holds {len(arrays)}")
    tensors: dict[str, Tensor] = {}
    for i, t in enumerate(entries):
        if not isinstance(t, dict) or not {"path", "role", "batch_norm", "trainable", "crc32"} <= t.keys():
            raise bad(f"malformed metadata: tensor entry {i} lacks path, role, batch_norm, trainable or crc32")
        path = t["path"]
        if not isinstance(path, str) or path not in arrays:
            raise bad(f"tensor {path!r} is listed in the metadata but not stored")
        if path in tensors:
            raise bad(f"tensor {path} is listed twice in the metadata")
        try:
            cls = TensorClass.from_json(t["role"], t["batch_norm"], t["trainable"], f"tensor {path}")
        except SegVizFormatError as e:
            raise bad(str(e)) from None
        values = arrays[path]
        if values.dtype != np.float32:
            raise bad(f"tensor {path}: dtype {values.dtype}, float32 expected")
        if zlib.crc32(np.require(values, dtype="<f4", requirements="C").tobytes()) != t["crc32"]:
            raise bad(f"tensor {path}: CRC-32 mismatch: the file is corrupted")
        tensors[path] = Tensor(values, cls)
    return Checkpoint(config=config, metadata=metadata, tensors=tensors)


def read_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Reads a SegViz model file; a missing, truncated or corrupted file raises
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
    """Writes ``checkpoint`` to ``path`` atomically as a SegViz model file."""
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
