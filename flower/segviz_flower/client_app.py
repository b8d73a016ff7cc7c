"""A placeholder ClientApp: Flower 1.42 requires every app to declare one.

SegViz sites are native Rust SuperNodes that speak the Fleet API themselves and never run a
Python ClientApp. If a stock ``flower-supernode`` joins a SegViz run by mistake, every
instruction it receives fails with an error saying so, and the ServerApp leaves that node out.
"""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

NATIVE_NODE_HELP = (
    "SegViz sites are native Rust nodes, not Python ClientApps: start each site with "
    "`cargo run --release --example flower_node` (see docs/flower.md) instead of a stock "
    "flower-supernode."
)

app = ClientApp()


def _refuse(msg: Message, context: Context) -> Message:
    raise RuntimeError(NATIVE_NODE_HELP)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Refuses: SegViz training runs in the Rust node."""
    return _refuse(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Refuses: SegViz evaluation runs in the Rust node."""
    return _refuse(msg, context)
