#!/usr/bin/env python3
"""Compare two ``.segviz`` model files tensor by tensor.

    python flower/tools/compare_models.py A.segviz B.segviz [--tolerance 1e-5]

Exit status 0 when both hold the same tensors (paths, shapes, classification) and every value
differs by at most ``--tolerance`` (absolute); 1 otherwise, with the worst tensors listed;
2 when a file cannot be read. Used by the Flower loopback test to check that the global model
of a Flower run equals the in-process federation's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from segviz_flower.segviz_format import SegVizFormatError, read_checkpoint  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--tolerance", type=float, default=1e-5)
    args = parser.parse_args()
    try:
        a, b = read_checkpoint(args.a), read_checkpoint(args.b)
    except (OSError, SegVizFormatError) as exc:
        print(f"compare_models: {exc}", file=sys.stderr)
        return 2
    if set(a.tensors) != set(b.tensors):
        only_a = sorted(set(a.tensors) - set(b.tensors))[:5]
        only_b = sorted(set(b.tensors) - set(a.tensors))[:5]
        print(f"different tensors: only in A {only_a}, only in B {only_b}")
        return 1
    worst: list[tuple[float, str]] = []
    identical = 0
    for path, ta in a.tensors.items():
        tb = b.tensors[path]
        if ta.data.shape != tb.data.shape or ta.cls != tb.cls:
            print(f"{path}: shape/classification differ ({ta.data.shape} vs {tb.data.shape})")
            return 1
        diff = float(np.max(np.abs(ta.data.astype(np.float64) - tb.data.astype(np.float64)), initial=0.0))
        identical += int(np.array_equal(ta.data, tb.data))
        worst.append((diff, path))
    worst.sort(reverse=True)
    largest = worst[0][0] if worst else 0.0
    print(
        f"{len(worst)} tensors compared: {identical} bit-identical, "
        f"largest absolute difference {largest:.3g} ({worst[0][1] if worst else '-'})"
    )
    if largest > args.tolerance:
        for diff, path in worst[:5]:
            print(f"  {path}: {diff:.3g}")
        print(f"difference above the tolerance {args.tolerance:g}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
