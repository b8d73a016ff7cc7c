"""Flower requires a ClientApp; the nodes here are SegViz Rust nodes, so it only refuses."""

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    raise RuntimeError("this app is for SegViz Rust nodes (flower_node --uniform-reply)")
