"""End-to-end inference: `seg3d infer` (attention_unet through its bundle) against MONAI's `AttentionUnet` run by a
MONAI tutorial pipeline (LoadImaged ... sliding_window_inference ... Invertd, SaveImaged), side by side in one run,
both trained identically on the demo's phantoms, at the same patch size, overlap and Gaussian blending.

    python -m benchmarks.inference [--quick] [--reuse-models] [--device cuda] [--config configs/attention_unet.yaml
                                   --untrained] [--real-ct PATH] [--iterations N] [--results DIR]

Inputs: a CT-sized phantom (512 x 512 x 200 at 0.8 x 0.8 x 2.5 mm), ../shared/data/real_ct/ct.nii.gz and the 4
phantom test cases. Per run: wall time (model loading included) and the stages load, preprocess, network, stitch,
invert and write; Dice on the test cases in each case's own geometry.
Targets (CPU): seg3d at least 3x faster than the fp32 MONAI pipeline at equal or better Dice; the network at least
85% of the stages; bf16 Dice within 0.005 of fp32. On a GPU machine the section is `inference-gpu`.

For the GPU check (benchmarks/gpu/check.sh): `--config` another network than the demo's (MONAI's AttentionUnet then
gets the same channels and strides), `--untrained` times both with their initial weights (no training, no Dice),
`--iterations` shortens the training, `--results DIR` writes the section's text and rows to DIR (read by
benchmarks/gpu/report.py) instead of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from attention3d import create_model
from benchmarks._report import ROOT, table, write_section
from benchmarks.monai_tutorial import STAGES, monai_network, run_monai
from pipeline.bundle import load_bundle, save_bundle
from pipeline.config import load_config
from pipeline.datalists import load_dataset
from pipeline.devices import autocast, resolve_precision
from pipeline.imageio import read_volume
from pipeline.infer import run_inference
from pipeline.integrity import check_dataset
from pipeline.losses import SegLoss
from pipeline.metrics import dice_per_class, mean_foreground_dice
from pipeline.optimizer import build_optimizer
from pipeline.splits import kfold_split
from pipeline.synthetic import CaseSpec, make_phantom, save_atomic, synthesize, to_nifti
from pipeline.train_data import epoch_loader, make_train_dataset
from pipeline.transforms import IMAGE, LABEL, as_record, compute_preprocessing

REAL_CT = ROOT.parent / "shared" / "data" / "real_ct" / "ct.nii.gz"
BIG = CaseSpec(shape=(512, 512, 200), spacing=(0.8, 0.8, 2.5), orientation="RAS", tumour=True, decoys=3)
QUICK_BIG = CaseSpec(shape=(96, 96, 40), spacing=(0.8, 0.8, 2.5), orientation="RAS", tumour=True, decoys=3)
QUICK = ["train.epochs=1", "train.iterations_per_epoch=2"]


# -- data and training ------------------------------------------------------------------------------------------


def make_data(work: Path, quick: bool):
    """The phantom set `seg3d demo` uses (12 + 4 cases, seed 0), and one CT-sized phantom with its label."""
    data = work / "data"
    if not (data / "dataset.json").exists():
        synthesize(data, cases=5 if quick else 12, seed=0, test_cases=1 if quick else 4, overwrite=True)
    big = work / "big" / "big_phantom.nii.gz"
    if not big.exists():
        big.parent.mkdir(parents=True, exist_ok=True)
        image, label, affine = make_phantom(np.random.default_rng(123), QUICK_BIG if quick else BIG)
        save_atomic(to_nifti(image, affine, "RAS"), big)
        save_atomic(to_nifti(label, affine, "RAS"), big.parent / "big_phantom_label.nii.gz")
    return load_dataset(data), big


def train(model: nn.Module, cfg, dataset, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """pipeline.train's step (same loss, optimiser, schedule, clipping, precision, patches), without validation:
    both networks keep their final weights."""
    model.to(device).train()
    total = cfg.train.epochs * cfg.train.iterations_per_epoch
    opt, sched = build_optimizer(cfg, model, total)
    loss_fn = SegLoss(cfg, [], 3)
    start, losses = time.perf_counter(), []
    for epoch in range(cfg.train.epochs):
        for batch in epoch_loader(cfg, dataset, epoch=epoch, workers=0):  # patches depend on (seed, epoch) only
            image, label = batch[IMAGE].to(device), batch[LABEL].to(device).long()
            opt.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                out = model(image)
            loss = loss_fn(out, label)
            loss.backward()
            if cfg.train.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.item())
    print(
        f"  trained {type(model).__name__}: {total} iterations in {time.perf_counter() - start:.0f} s, "
        f"last loss {np.mean(losses[-20:]):.3f}",
        flush=True,
    )
    return model.eval()


# -- the two pipelines ------------------------------------------------------------------------------------------


def run_ours(bundle: Path, source: Path, out: Path, precision="auto", postprocess=True, repeats=2) -> dict:
    """`seg3d infer`; the last of `repeats` runs is kept. The first counts the windows through a hook on the model."""
    windows = [0]
    for attempt in range(repeats):
        given = load_bundle(bundle) if attempt == 0 else None  # later runs load the bundle inside the timing
        if given is not None:
            given.model.register_forward_hook(lambda m, args, o: windows.__setitem__(0, windows[0] + len(args[0])))
        start = time.perf_counter()
        kw = dict(precision=precision, postprocess=postprocess, overwrite=True, progress=False, bundle=given)
        summary = run_inference(bundle, source, out, **kw)
        wall = time.perf_counter() - start
        if summary.failed:
            raise RuntimeError(f"seg3d infer failed: {summary.failed}")
    stages = {s: sum(t.get(s, 0.0) for t in summary.timings.values()) for s in STAGES}
    return {"wall": wall, "stages": stages, "windows": windows[0]}


# -- report -----------------------------------------------------------------------------------------------------


def row(name: str, precision: str, result: dict, reference: dict) -> dict:
    stages, total = result["stages"], sum(result["stages"].values()) or 1e-9
    r = {"pipeline": name, "precision": precision, "windows": f"{result['windows']:,}"}
    r.update(wall=f"{result['wall']:.1f}", total=f"{total:.1f}", speedup=f"{reference['wall'] / result['wall']:.2f}x")
    r.update({s: f"{stages[s]:.1f} ({100 * stages[s] / total:.0f}%)" for s in STAGES})
    return r


def test_dice(out: Path, dataset, pre) -> list[float]:
    """Mean Dice per foreground class over the test cases, each in its own stored voxel grid."""
    per_case = []
    for case in dataset.test:
        pred = read_volume(out / f"{case.case}.nii.gz", case.case, "label").array
        ref = pre.remap(read_volume(case.label, case.case, "label").array, case.case)
        per_case.append(dice_per_class(pre.remap(pred, case.case), ref, pre.num_classes))
    return mean_foreground_dice(per_case)[0]


def dice_row(name: str, precision: str, post: str, out: Path, dataset, pre) -> dict:
    pancreas, cancer = test_dice(out, dataset, pre)
    return dict(pipeline=name, precision=precision, post=post, pancreas=f"{pancreas:.4f}", cancer=f"{cancer:.4f}")


COLUMNS = [("pipeline", "pipeline"), ("precision", "precision"), ("windows", "windows"), ("wall", "wall (s)")]
COLUMNS += [("speedup", "speed-up vs MONAI fp32"), ("total", "sum of stages (s)")]
COLUMNS += [(s, f"{s} (s)") for s in STAGES]
DICE_COLUMNS = [("pipeline", "pipeline"), ("precision", "precision"), ("post", "post-processing")]
DICE_COLUMNS += [("pancreas", "pancreas"), ("cancer", "cancer")]
OURS, PEER, POST = "seg3d infer (attention_unet)", "MONAI AttentionUnet, tutorial pipeline", "largest component etc."


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="tiny settings to check the script, not to measure")
    parser.add_argument("--reuse-models", action="store_true", help="reuse the networks trained by the last run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per pipeline and input; the last is kept")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA if present")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml", help="our network and settings")
    parser.add_argument("--untrained", action="store_true", help="time both networks untrained: no training, no Dice")
    parser.add_argument("--iterations", type=int, default=None, help="training iterations (default: the config's)")
    parser.add_argument("--real-ct", type=Path, default=REAL_CT, help="the real CT (NIfTI)")
    parser.add_argument("--results", type=Path, default=None, help="write the section to this folder, not docs/")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*Orientationd.__init__:labels", category=FutureWarning)
    warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")  # MONAI's optional DICOM decoder
    config_name = args.config.stem
    base = ROOT / ".bench" / ("inference_quick" if args.quick else "inference")
    # The data (base/data, base/big) is shared by every config; the networks and outputs are the config's own.
    work = base if config_name == "demo" else base / config_name
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    dtype = resolve_precision("auto", device)
    prec = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    overrides = QUICK if args.quick else []
    if args.iterations is not None and not args.quick:
        epochs = max(1, args.iterations // 100)  # the config's schedule, shortened (100 iterations an epoch)
        overrides = [f"train.epochs={epochs}", f"train.iterations_per_epoch={max(1, args.iterations // epochs)}"]
    cfg = load_config(args.config, overrides)
    iterations = 0 if args.untrained else cfg.train.epochs * cfg.train.iterations_per_epoch

    print("data ...", flush=True)
    dataset, big = make_data(base, args.quick)
    report = check_dataset(dataset, include_test=False)
    split = kfold_split([c.case for c in dataset.cases], cfg.train.folds, cfg.train.fold, cfg.train.seed)
    infos = {i.case: i for i in report.infos}
    pre = compute_preprocessing(cfg, dataset.labels, dataset.exhaustive, [infos[c] for c in split["train"]])
    bundle, weights = work / "models" / "bundle", work / "models" / "monai_attention_unet.pt"
    if args.untrained:
        torch.manual_seed(cfg.train.seed)
        ours = create_model(cfg.model.name, in_channels=1, out_channels=3, **cfg.model.overrides())
        save_bundle(bundle, ours.eval(), cfg, pre, {})
        torch.manual_seed(cfg.train.seed)
        torch.save(monai_network(cfg).state_dict(), weights)
    elif not (args.reuse_models and bundle.exists() and weights.exists()):
        print(f"training both networks ({iterations} iterations each) ...", flush=True)
        cases = {c.case: c for c in dataset.cases}
        records = [as_record(c, cases[c].image, cases[c].label) for c in split["train"]]
        train_ds = make_train_dataset(cfg, pre, records=records, run_dir=work)
        torch.manual_seed(cfg.train.seed)
        ours = create_model(cfg.model.name, in_channels=1, out_channels=3, **cfg.model.overrides())
        save_bundle(bundle, train(ours, cfg, train_ds, device, dtype).cpu(), cfg, pre, {})
        torch.manual_seed(cfg.train.seed)
        torch.save(train(monai_network(cfg), cfg, train_ds, device, dtype).cpu().state_dict(), weights)

    shape = " x ".join(map(str, (QUICK_BIG if args.quick else BIG).shape))
    inputs, notes = [("big", f"Phantom {shape} at 0.8 x 0.8 x 2.5 mm", big)], []
    if args.real_ct.exists() and (not args.quick or args.real_ct != REAL_CT):
        ct = read_volume(args.real_ct, "real CT")
        size = f"{' x '.join(map(str, ct.array.shape))} at {' x '.join(f'{s:g}' for s in ct.spacing)} mm"
        inputs.append(("real", f"Real CT `{args.real_ct.name}` ({size})", args.real_ct))
    else:
        notes.append(f"No row for the real CT ({'--quick' if args.quick else f'{args.real_ct} is absent'}).")
    test_folder = base / "data" / "imagesTs"
    if not args.untrained:  # untrained networks: timings only, no Dice worth a row
        inputs.append(("test", f"Phantom test set, {len(dataset.test)} cases (summed)", test_folder))

    tables, dice_rows, raw = [], [], []
    for key, title, source in inputs:
        print(f"{title}:", flush=True)
        images = sorted(source.glob("*.nii.gz")) if source.is_dir() else [source]
        out = work / "out" / key
        shutil.rmtree(out, ignore_errors=True)
        runs = [(PEER, "fp32", "monai_fp32"), (OURS, prec, "ours"), (PEER + " + autocast", "bf16", "monai_bf16")]
        if key == "test" and prec != "fp32":
            runs.append((OURS, "fp32", "ours_fp32"))
        rows, reference = [], None
        for name, precision, folder in runs:
            if name == OURS:
                result = run_ours(
                    bundle, source, out / folder, "fp32" if precision == "fp32" else "auto", True, args.repeats
                )
            else:
                result = run_monai(
                    weights, images, out / folder, pre, cfg, device, precision == "bf16", repeats=args.repeats
                )
            reference = reference or result  # MONAI fp32, measured first
            rows.append(row(name, precision, result, reference))
            raw.append({"input": key, "pipeline": name, "precision": precision, **result})
            print("  ", rows[-1], flush=True)
            if key == "test":
                dice_rows.append(
                    dice_row(name, precision, POST if name == OURS else "none", out / folder, dataset, pre)
                )
        tables.append(f"#### {title}\n\n" + table(rows, COLUMNS))

    test_out = work / "out" / "test"
    if not args.untrained:
        run_ours(bundle, test_folder, test_out / "ours_nopost", postprocess=False, repeats=1)
        dice_rows.insert(2, dice_row(OURS, prec, "none", test_out / "ours_nopost", dataset, pre))
    for r in dice_rows:
        print("  ", r, flush=True)
    if args.untrained:
        notes.append("Both networks untrained (initial weights): timings only.")
    elif prec != "fp32":
        a, b = (test_dice(test_out / f, dataset, pre) for f in ("ours", "ours_fp32"))
        diff = f"pancreas {a[0] - b[0]:+.4f}, cancer {a[1] - b[1]:+.4f}"
        notes.append(f"seg3d {prec} minus fp32 Dice: {diff} (target: within 0.005).")
    else:
        notes.append("Without native bf16 on this CPU, seg3d's `auto` precision is fp32 here.")

    inf = cfg.inference
    channels = ", ".join(map(str, cfg.model.channels))
    trained = (
        "both networks untrained (initial weights: timings only)"
        if args.untrained
        else f"both networks trained alike on the demo's phantoms ({iterations} iterations of "
        f"`configs/{config_name}.yaml`'s loop, {prec} autocast, the same patches, final weights)"
    )
    body = (
        f"### End-to-end inference: seg3d infer vs a MONAI tutorial pipeline ({device.type.upper()}, "
        f"`configs/{config_name}.yaml`)\n\n"
        + ("**--quick: a check of the script, not a measurement.**\n\n" if args.quick else "")
        + f"seg3d: `run_inference` on the bundle of `configs/{config_name}.yaml`'s `{cfg.model.name}` (norm "
        f"`{cfg.model.norm or 'instance'}`; batch norm is folded into the "
        "convolutions at inference; channels-last on CPU; precision `auto`; the bundle's post-processing: largest "
        f"component, tumour inside pancreas). MONAI: `AttentionUnet` with the same channels ({channels}) and "
        "strides, through "
        "`LoadImaged` (nibabel), `EnsureChannelFirstd`, `Orientationd(RAS)`, `Spacingd` (bilinear), the same clip "
        "and z-score, no foreground crop, `sliding_window_inference`, `Invertd`, `AsDiscreted(argmax)`, `SaveImaged`. "
        f"Both: patch {' x '.join(map(str, cfg.data.patch_size))}, overlap {inf.overlap}, sw_batch_size "
        f"{inf.sw_batch_size}, Gaussian blending (sigma_scale {inf.sigma_scale}), target spacing {pre.target_spacing} "
        f"mm; {trained}. Wall time "
        "includes loading the model; stages in seconds (% of their sum: the network's is its share); network is "
        "time inside the forward, stitch the rest of the sliding window; seg3d's invert includes its post-processing; "
        f"windows are patches through the network. {args.repeats} run(s) per row, the last kept. "
        "Targets: >= 3x faster than MONAI fp32 on CPU at equal or better "
        "Dice; network >= 85%.\n\n"
        + "\n\n".join(tables)
        + (
            "\n\n#### Dice on the phantom test cases (each in its own geometry)\n\n" + table(dice_rows, DICE_COLUMNS)
            if dice_rows
            else ""
        )
        + "\n\n"
        + " ".join(notes)
    )
    if args.results is not None:  # the GPU check: benchmarks/gpu/report.py puts it into docs/benchmarks.md
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"inference_{config_name}.md").write_text(body)
        (args.results / f"inference_{config_name}.json").write_text(json.dumps({"runs": raw, "dice": dice_rows}))
        return
    write_section("inference-gpu" if device.type == "cuda" else "inference", body)


if __name__ == "__main__":
    main()
