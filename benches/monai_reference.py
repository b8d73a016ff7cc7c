"""MONAI + PyTorch reference for the SegViz patch-throughput figures.

Runs MONAI's UNet with the same sizes, optimiser (Adam, eps 1e-8) and loss (Dice + CE) as
`cargo run --release --example patch_throughput`, on the same machine, and prints one JSON
line per size with the median milliseconds per training step, per inference patch, and the
peak resident memory of the process.

With ``--predict SCAN.nii.gz`` it instead times one whole scan end to end, as
``cargo bench --bench whole_scan`` does on the same file (that bench writes it and prints its
path): load, reorient to RAS, resample to 4×4×5 mm, window −200…250 HU, MONAI's
``sliding_window_inference`` (ROI 96×96×48, overlap 0.25, Gaussian blending with
sigma_scale 0.125, 4 windows a batch) through a UNet with channels 8–64 and five output
classes, arg-max, and nearest resampling back to the scan's grid.

With ``--preprocess IMAGE LABEL`` it times the preprocessing that
``cargo bench --bench data_pipeline -- preprocess`` times (that bench writes the pair and prints
the paths): load both, reorient to RAS, resample to 1.5×1.5×2 mm (bilinear for the image,
nearest for the labels), window −200…200 HU with clipping, pad to a multiple of 16.

Not needed for the tests. Usage (``pip install torch monai nibabel``; PyPI's torch wheel runs
on the CPU):

    python3 benches/monai_reference.py --size all --steps 10
    python3 benches/monai_reference.py --predict /tmp/segviz-whole-scan/ct_512x512x100.nii.gz
    python3 benches/monai_reference.py --preprocess /tmp/segviz-data-pipeline/ct.nii.gz \
        /tmp/segviz-data-pipeline/ct_label.nii.gz
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


def environment() -> dict:
    """Which framework, which torch, how many threads."""
    return {"framework": "monai", "torch": torch.__version__, "threads": torch.get_num_threads()}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


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

    return {
        **environment(),
        "size": name,
        "batch": BATCH,
        "train_step_ms": round(statistics.median(train_ms), 2),
        "inference_ms_per_patch": round(statistics.median(infer_ms), 2),
        "peak_rss_mib": peak_rss_mib(),
    }


def predict(path: str, repeats: int) -> dict:
    """Median seconds to segment the scan at ``path`` end to end (see the module docs)."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import EnsureChannelFirst, LoadImage, Orientation, ScaleIntensityRange, Spacing

    torch.manual_seed(0)
    model = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=5,
        channels=(8, 16, 32, 64),
        strides=(2, 2, 2),
        num_res_units=2,
        norm="batch",
    ).eval()
    load = LoadImage(image_only=True)
    channel_first = EnsureChannelFirst()
    orient = Orientation(axcodes="RAS", labels=None)
    resample = Spacing(pixdim=(4.0, 4.0, 5.0), mode="bilinear")
    window = ScaleIntensityRange(a_min=-200.0, a_max=250.0, b_min=0.0, b_max=1.0, clip=True)

    seconds = []
    for step in range(repeats + 1):
        start = time.perf_counter()
        scan = channel_first(load(path))
        original_shape = tuple(scan.shape[1:])
        image = window(resample(orient(scan)))
        with torch.no_grad():
            logits = sliding_window_inference(
                image.unsqueeze(0),
                roi_size=(96, 96, 48),
                sw_batch_size=4,
                predictor=model,
                overlap=0.25,
                mode="gaussian",
                sigma_scale=0.125,
            )
            labels = torch.argmax(logits, dim=1, keepdim=True).float()
            labels = torch.nn.functional.interpolate(labels, size=original_shape, mode="nearest")
        labels = labels.to(torch.uint8)  # the label map a user would write
        if step >= 1:  # the first pass warms up allocators and kernels
            seconds.append(time.perf_counter() - start)

    return {
        **environment(),
        "scan": path,
        "scan_shape": list(original_shape),
        "predict_s": round(statistics.median(seconds), 3),
        "peak_rss_mib": peak_rss_mib(),
    }


def preprocess(image_path: str, label_path: str, repeats: int) -> dict:
    """Median seconds to preprocess one image and its labels (see the module docs)."""
    from monai.transforms import (
        Compose,
        DivisiblePadd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    keys = ["image", "label"]
    transform = Compose(
        [
            LoadImaged(keys=keys),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS", labels=None),
            Spacingd(keys=keys, pixdim=(1.5, 1.5, 2.0), mode=("bilinear", "nearest")),
            ScaleIntensityRanged(keys="image", a_min=-200.0, a_max=200.0, b_min=0.0, b_max=1.0, clip=True),
            DivisiblePadd(keys=keys, k=16),
        ]
    )
    seconds = []
    shape = None
    for step in range(repeats + 1):
        start = time.perf_counter()
        out = transform({"image": image_path, "label": label_path})
        shape = list(out["image"].shape[1:])
        if step >= 1:  # the first pass warms up allocators and imports
            seconds.append(time.perf_counter() - start)
    return {
        **environment(),
        "image": image_path,
        "preprocessed_shape": shape,
        "preprocess_s": round(statistics.median(seconds), 3),
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="all", choices=["all", *SIZES])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--predict", metavar="SCAN", help="time one whole scan end to end instead")
    parser.add_argument(
        "--preprocess", nargs=2, metavar=("IMAGE", "LABEL"), help="time preprocessing of one pair instead"
    )
    args = parser.parse_args()
    if args.preprocess:
        print(json.dumps(preprocess(*args.preprocess, args.steps)), flush=True)
        return
    if args.predict:
        print(json.dumps(predict(args.predict, args.steps)), flush=True)
        return
    names = list(SIZES) if args.size == "all" else [args.size]
    for name in names:
        print(json.dumps(measure(name, args.steps)), flush=True)


if __name__ == "__main__":
    main()
