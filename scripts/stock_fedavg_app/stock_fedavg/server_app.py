"""A ServerApp as in Flower's docs: stock FedAvg, initial arrays from an .npz file.

It saves the final arrays (``final.npz``) and the per-round aggregated metrics
(``metrics.json``) in ``out-dir`` for the loopback script to check.
"""

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    rounds = int(cfg["num-server-rounds"])
    with np.load(str(cfg["initial-npz"])) as npz:
        arrays = ArrayRecord({name: Array(np.ascontiguousarray(npz[name])) for name in npz.files})
    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=int(cfg["min-nodes"]),
        min_evaluate_nodes=int(cfg["min-nodes"]),
        min_available_nodes=int(cfg["min-nodes"]),
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=rounds,
        timeout=float(cfg["round-timeout"]),
        train_config=ConfigRecord({"local-epochs": int(cfg["local-epochs"]), "num-server-rounds": rounds}),
    )
    out = Path(str(cfg["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "final.npz", **{name: a.numpy() for name, a in result.arrays.items()})
    metrics = {
        "train": {str(r): dict(m) for r, m in result.train_metrics_clientapp.items()},
        "evaluate": {str(r): dict(m) for r, m in result.evaluate_metrics_clientapp.items()},
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
