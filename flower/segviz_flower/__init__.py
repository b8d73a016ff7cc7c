"""SegViz on Flower 1.42: the ServerApp, the SegViz aggregation rule and the ``.segviz`` format.

The federation's nodes are native Rust programs (``cargo run --release --example
flower_node``); this package is the server side. See docs/flower.md for the wire contract.
"""
