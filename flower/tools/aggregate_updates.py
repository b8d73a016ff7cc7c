#!/usr/bin/env python3
"""Aggregate SegViz client updates stored as ``.segviz`` files, as the Flower ServerApp does.

    python flower/tools/aggregate_updates.py --global G.segviz \\
        --updates U1.segviz U2.segviz ... --strategy fedbn --weighting examples \\
        --round 2 --out OUT.segviz

Each update file's metadata must hold ``{"client": str, "tasks": [str, ...],
"num_examples": int}``; each tensor's classification comes from the file's header. The result
is the global model of ``--global`` with the aggregated tensors, written atomically with the
global file's configuration and metadata ``{"round", "strategy", "weighting"}``.

``--strategy`` is any SegViz strategy: ``fedavg``, ``fedbn``, ``fedprox``, or a partial-label one,
``fedavg_pl`` or ``fedbn_pl``, aggregated as the strategy it wraps (its updates carry every
head, each averaged over the updates carrying it, as for the plain strategies).

Updates are aggregated in the order given on the command line (float64 sums in that order,
as the Rust ``AggregationStrategy::aggregate_fit`` does with its slice); the ServerApp sorts
them by client name first. Used by the Rust test that compares both implementations.

Exit status: 0 on success, 2 on a usage or input error (message on stderr).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from segviz_flower.aggregate import (  # noqa: E402
    STRATEGIES,
    WEIGHTINGS,
    AggregationError,
    Update,
    aggregate,
)
from segviz_flower.segviz_format import (  # noqa: E402
    Checkpoint,
    SegVizFormatError,
    read_checkpoint,
    write_checkpoint,
)


def update_from_file(path: str) -> Update:
    """Reads one client update; its metadata must name the client, tasks and examples."""
    checkpoint = read_checkpoint(path)
    meta = checkpoint.metadata
    if not isinstance(meta, dict):
        raise SegVizFormatError(f"{path}: metadata must be an object with client, tasks and num_examples")
    client, tasks, n = meta.get("client"), meta.get("tasks"), meta.get("num_examples")
    if not isinstance(client, str) or not client:
        raise SegVizFormatError(f"{path}: metadata client must be a non-empty string")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise SegVizFormatError(f"{path}: metadata tasks must be a list of strings")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise SegVizFormatError(f"{path}: metadata num_examples must be a non-negative integer, got {n!r}")
    return Update(client=client, tasks=tasks, num_examples=n, tensors=checkpoint.tensors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--global", dest="global_path", required=True, help="the global model before the round (.segviz)")
    parser.add_argument("--updates", nargs="+", required=True, help="client updates (.segviz), in aggregation order")
    parser.add_argument("--strategy", choices=STRATEGIES, required=True,
                        help="a SegViz strategy; fedavg_pl and fedbn_pl aggregate as fedavg and fedbn")
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="examples")
    parser.add_argument("--round", type=int, default=1, help="the round being aggregated (1-based)")
    parser.add_argument("--owner-weight", default="plain",
                        help="partial-label strategies: the share of each head taken from its owners, "
                             "in [0, 1], or 'plain' for one mean over every update (default)")
    parser.add_argument("--server-learning-rate", type=float, default=1.0,
                        help="step size on the representation block: g + rate * (mean - g) (default 1)")
    parser.add_argument("--out", required=True, help="where to write the new global model (.segviz)")
    args = parser.parse_args(argv)
    try:
        global_model = read_checkpoint(args.global_path)
        updates = [update_from_file(p) for p in args.updates]
        owner_weight = None if args.owner_weight == "plain" else float(args.owner_weight)
        state = aggregate(
            args.round, global_model.tensors, updates, args.strategy, args.weighting, owner_weight=owner_weight,
            server_learning_rate=args.server_learning_rate,
        )
        write_checkpoint(
            args.out,
            Checkpoint(
                config=global_model.config,
                metadata={"round": args.round, "strategy": args.strategy, "weighting": args.weighting},
                tensors=state,
            ),
        )
    except (SegVizFormatError, AggregationError) as e:
        print(f"aggregate_updates: {e}", file=sys.stderr)
        return 2
    print(f"aggregate_updates: {len(updates)} update(s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
