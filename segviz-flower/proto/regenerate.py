#!/usr/bin/env python3
"""Regenerates the Flower protocol definitions SegViz's node is built from.

Run it with the Python of a virtual environment where the pinned flwr release is installed:

    python3 -m venv /tmp/flwr && /tmp/flwr/bin/pip install flwr==1.42.0
    /tmp/flwr/bin/python segviz-flower/proto/regenerate.py

It reads the compiled descriptors that ship inside the flwr wheel (the `flwr/proto/*_pb2.py`
modules carry the exact `.proto` definitions the SuperLink was built from), keeps `fleet.proto`
and everything it imports, and writes them as one `FileDescriptorSet`
(`flwr-<version>.binpb`) next to this script. `segviz-flower/build.rs` turns that set into
Rust types with prost-build at build time; no `protoc` is needed. A Flower upgrade is: install
the new wheel, run this script, update `FLWR_VERSION` in `segviz-flower/src/protocol/mod.rs`,
rebuild and run the loopback test.
"""

import importlib
import pathlib
import sys

from google.protobuf import descriptor_pb2

import flwr
from flwr.proto import fleet_pb2

HERE = pathlib.Path(__file__).resolve().parent


def collect(file_descriptor, seen, ordered):
    """Depth-first: every import before the file that imports it."""
    if file_descriptor.name in seen:
        return
    seen.add(file_descriptor.name)
    for dependency in file_descriptor.dependencies:
        collect(dependency, seen, ordered)
    ordered.append(file_descriptor)


def main() -> int:
    version = flwr.__version__ if hasattr(flwr, "__version__") else None
    if version is None:
        version = importlib.metadata.version("flwr")
    ordered = []
    collect(fleet_pb2.DESCRIPTOR, set(), ordered)
    file_set = descriptor_pb2.FileDescriptorSet()
    for file_descriptor in ordered:
        if file_descriptor.name.startswith("google/protobuf/"):
            # Well-known types come from the prost-types crate.
            continue
        proto = descriptor_pb2.FileDescriptorProto.FromString(file_descriptor.serialized_pb)
        file_set.file.append(proto)
    for old in HERE.glob("flwr-*.binpb"):
        old.unlink()
    out = HERE / f"flwr-{version}.binpb"
    out.write_bytes(file_set.SerializeToString(deterministic=True))
    names = ", ".join(f.name for f in file_set.file)
    print(f"wrote {out.name} ({out.stat().st_size} bytes) from flwr {version}: {names}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
