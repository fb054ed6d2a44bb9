"""Does data loading bound training? Training iterations/s with the real loader (cached preprocessing, random
patch sampling and augmentation, DataLoader workers) against iterations/s on pre-loaded tensors (the same batches
collected beforehand, so only the network step is timed), same model, optimiser and precision, in one run.

    python -m benchmarks.loader [--iterations 40] [--configs demo,attention_unet]

Target: the real loader within 10% of pre-loaded tensors (ratio >= 0.90).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks._report import ROOT, table, write_section
from pipeline.config import load_config
from pipeline.datalists import load_dataset
from pipeline.devices import autocast, resolve_precision
from pipeline.integrity import check_dataset
from pipeline.losses import SegLoss
from pipeline.optimizer import build_optimizer
from pipeline.summary import build
from pipeline.synthetic import synthesize
from pipeline.train_data import epoch_loader, make_train_dataset
from pipeline.transforms import IMAGE, LABEL, as_record, compute_preprocessing

DATA = ROOT / ".bench" / "loader_data"
SETTINGS = {
    # name: (config file, overrides)
    "demo": ("demo.yaml", []),
    "attention_unet": ("attention_unet.yaml", ["data.target_spacing=[1.0, 1.0, 3.0]", "data.patch_size=[96, 96, 48]"]),
}


def _dataset(cases: int):
    if not (DATA / "dataset.json").exists():
        synthesize(DATA, cases=cases, seed=11, test_cases=1, overwrite=True)
    return load_dataset(DATA)


def _measure(name: str, iterations: int, workers: int, warmup: int = 5) -> dict:
    file, overrides = SETTINGS[name]
    cfg = load_config(
        ROOT / "configs" / file,
        [*overrides, f"data.num_workers={workers}", f"train.iterations_per_epoch={iterations + warmup}"],
    )
    dataset = _dataset(8)
    report = check_dataset(dataset, include_test=False)
    pre = compute_preprocessing(cfg, dataset.labels, dataset.exhaustive, report.infos)
    records = [as_record(c.case, c.image, c.label) for c in dataset.cases]
    train_ds = make_train_dataset(cfg, pre, records=records, run_dir=ROOT / ".bench")
    device = torch.device("cpu")
    dtype = resolve_precision(cfg.train.precision, device)

    def fresh():
        torch.manual_seed(0)
        model = build(cfg.model.name, spatial_dims=3, in_channels=1, out_channels=3, **cfg.model.overrides())
        opt, _ = build_optimizer(cfg, model, 10_000)
        return model.train(), opt, SegLoss(cfg, model.aux_outputs, 3)

    def step(model, opt, loss_fn, batch):
        opt.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            out = model(batch[IMAGE])
        loss = loss_fn(out, batch[LABEL].long())
        loss.backward()
        opt.step()

    def real_loader() -> float:
        model, opt, loss_fn = fresh()
        it = iter(epoch_loader(cfg, train_ds, epoch=0, workers=workers))
        for _ in range(warmup):
            step(model, opt, loss_fn, next(it))
        start = time.perf_counter()
        for batch in it:
            step(model, opt, loss_fn, batch)
        return iterations / (time.perf_counter() - start)

    batches = list(epoch_loader(cfg, train_ds, epoch=0, workers=workers))

    def preloaded() -> float:
        model, opt, loss_fn = fresh()
        for batch in batches[:warmup]:
            step(model, opt, loss_fn, batch)
        start = time.perf_counter()
        for batch in batches[warmup:]:
            step(model, opt, loss_fn, batch)
        return iterations / (time.perf_counter() - start)

    real, pre_rates = [], []
    for _ in range(3):  # interleaved, so drifts in clock or load hit both alike
        pre_rates.append(preloaded())
        real.append(real_loader())
    r, p = statistics.median(real), statistics.median(pre_rates)
    patch = "x".join(map(str, cfg.data.patch_size))
    channels = list(cfg.model.channels or [])
    return {
        "setting": f"{name}: {cfg.model.name} {channels}, patch {patch}, batch {cfg.train.batch_size}",
        "precision": str(dtype).removeprefix("torch."),
        "workers": workers,
        "real": f"{r:.2f}",
        "pre": f"{p:.2f}",
        "ratio": f"{r / p:.3f}",
        "ok": "yes" if r / p >= 0.9 else "no",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--configs", default="demo,attention_unet")
    parser.add_argument("--workers", default="0,1")
    args = parser.parse_args()
    rows = []
    for name in args.configs.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            iterations = args.iterations if name == "demo" else max(10, args.iterations // 4)
            rows.append(_measure(name, iterations, workers))
            print(rows[-1], flush=True)
    body = (
        "### Data loading versus pre-loaded tensors (training)\n\n"
        "Iterations/s of the training step fed by the real loader (MONAI `CacheDataset` of the preprocessed volumes, "
        "random patch sampling and augmentation in a `DataLoader` with the given workers) against the same step on "
        "pre-loaded tensors (the batches collected beforehand). Median of 3 interleaved runs per mode, after 5 "
        "warm-up iterations; 8 phantom cases. Target: ratio >= 0.90. The default, `data.num_workers: null`, is 0 "
        "workers when training on a CPU (a loader process only takes cores from the network) and half the cores, "
        "at most 8, on a GPU.\n\n"
        + table(
            rows,
            [
                ("setting", "setting"),
                ("precision", "precision"),
                ("workers", "loader workers"),
                ("real", "real loader (it/s)"),
                ("pre", "pre-loaded (it/s)"),
                ("ratio", "ratio"),
                ("ok", ">= 0.90"),
            ],
        )
    )
    write_section("loader", body)


if __name__ == "__main__":
    main()
