"""MONAI + PyTorch reference for the SegViz patch-throughput figures.

Runs MONAI's UNet with the same sizes, optimiser (Adam, eps 1e-8) and loss (Dice + CE) as
`cargo run --release --example patch_throughput`, on the same machine, and prints one JSON
line per size with the median milliseconds per training step, per inference patch, and the
peak resident memory of the process.

Not needed for the tests. Usage (torch and monai installed):

    python3 benches/monai_reference.py --size all --steps 10
"""

import argparse
import json
import resource
import statistics
import time

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

SIZES = {
    "tiny": ((4, 8, 16, 32, 64), (32, 32, 16)),
    "small": ((8, 16, 32, 64, 128), (64, 64, 16)),
    "paper": ((16, 32, 64, 128, 256), (128, 128, 32)),
}
BATCH = 2


def measure(name: str, steps: int) -> dict:
    channels, patch = SIZES[name]
    torch.manual_seed(0)
    model = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=2,
        channels=channels,
        strides=(2, 2, 2, 2),
        num_res_units=2,
        norm="batch",
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4, eps=1e-8)
    loss_fn = DiceCELoss(softmax=True, to_onehot_y=True)
    x = torch.rand(BATCH, 1, *patch)
    y = (torch.rand(BATCH, 1, *patch) > 0.7).long()

    model.train()
    train_ms = []
    for step in range(steps + 2):
        start = time.perf_counter()
        optimiser.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimiser.step()
        if step >= 2:  # the first two steps warm up allocators and kernels
            train_ms.append((time.perf_counter() - start) * 1e3)

    model.eval()
    infer_ms = []
    with torch.no_grad():
        for step in range(steps + 2):
            start = time.perf_counter()
            torch.softmax(model(x), dim=1)
            if step >= 2:
                infer_ms.append((time.perf_counter() - start) * 1e3 / BATCH)

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "framework": "monai",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "size": name,
        "batch": BATCH,
        "train_step_ms": round(statistics.median(train_ms), 2),
        "inference_ms_per_patch": round(statistics.median(infer_ms), 2),
        "peak_rss_mib": round(peak_kib / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="all", choices=["all", *SIZES])
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    names = list(SIZES) if args.size == "all" else [args.size]
    for name in names:
        print(json.dumps(measure(name, args.steps)), flush=True)


if __name__ == "__main__":
    main()
