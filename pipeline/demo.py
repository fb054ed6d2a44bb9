"""`seg3d demo`: the whole job on an embedded default, in minutes on a CPU.

Synthesise a small phantom dataset (MSD layout), train the Attention U-Net of `configs/demo.yaml` with MLflow in
a local sqlite file, predict the held-out test cases through the saved bundle exactly as `seg3d infer` would
(in each scan's own geometry), score them against their reference labels, log `test_dice_<label>` to the same
MLflow run, and write overlays.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from pipeline.bundle import load_bundle
from pipeline.config import load_config
from pipeline.datalists import load_dataset
from pipeline.errors import Seg3dError
from pipeline.fileio import check_inside
from pipeline.imageio import read_volume
from pipeline.metrics import dice_per_class, mean_foreground_dice
from pipeline.plots import overlay_png
from pipeline.predict import Predictor
from pipeline.synthetic import synthesize
from pipeline.tracking import Tracker
from pipeline.train import train

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@dataclass
class DemoResult:
    output: Path
    run_id: str | None
    tracking_uri: str
    test_dice: dict[str, float]  # class name -> mean Dice over the test cases
    per_case: dict[str, list[float]]
    seconds: float


def run_demo(
    output: Path | None = None,
    cases: int = 12,
    test_cases: int = 4,
    seed: int = 0,
    tracking_uri: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    config: Path | None = None,
    progress: bool | None = None,
) -> DemoResult:
    start = time.perf_counter()
    output = Path(output) if output else Path("runs") / f"demo-{datetime.now():%Y%m%d-%H%M%S}"
    if (output / "run").exists():
        raise Seg3dError(f"{output} already holds a demo run; choose another --output")
    config = Path(config) if config else DEMO_CONFIG
    cfg = load_config(config, overrides)

    print(f"[1/4] synthesising {cases} training and {test_cases} test phantoms in {output / 'data'}")
    synthesize(output / "data", cases=cases, seed=seed, test_cases=test_cases, overwrite=True)

    print(f"[2/4] training {cfg.model.name} for {cfg.train.epochs} epochs on {cfg.train.device} ({config.name})")
    result = train(cfg, output / "data", output / "run", tracking_uri, config_path=config, progress=progress)

    print(f"[3/4] predicting the {test_cases} held-out test cases from the bundle {result.bundle}")
    bundle = load_bundle(result.bundle)
    predictor = Predictor.from_bundle(bundle, precision=cfg.train.precision)
    dataset = load_dataset(output / "data")
    names = bundle.label_names
    per_case: dict[str, list[float]] = {}
    overlays = []
    for case in dataset.test:
        if case.label is None:
            continue
        pred = predictor.predict_file(case.image, case=case.case)
        image = read_volume(case.image, case.case)
        ref = bundle.preprocessing.remap(read_volume(case.label, case.case, "label").array, case.case)
        per_case[case.case] = dice_per_class(pred.labels, ref, len(names))
        overlays.append(
            overlay_png(
                check_inside(output, output / "overlays" / f"{case.case}.png", what="the demo folder"),
                image.array,
                image.affine,
                ref,
                pred.labels,
                names,
                title=f"{case.case} (held-out test), {cfg.model.name}, Dice "
                + ", ".join(f"{n} {d:.3f}" for n, d in zip(names[1:], per_case[case.case])),
            )
        )
    per_class, mean = mean_foreground_dice(list(per_case.values()))
    test_dice = dict(zip(names[1:], per_class))

    print("[4/4] logging the test Dice and overlays to the MLflow run")
    tracker = Tracker(result.tracking_uri, cfg.experiment, output / "run")
    tracker.attach(result.run_id)
    tracker.log_metrics({f"test_dice_{n}": v for n, v in test_dice.items() if np.isfinite(v)}, step=result.epochs)
    for path in overlays:
        tracker.log_artifact(path, "test_overlays")
    tracker.end("FINISHED")

    seconds = time.perf_counter() - start
    width = max(len(n) for n in names)
    print(f"\nheld-out test Dice ({len(per_case)} cases; NaN where a class is absent from reference and prediction):")
    print(f"  {'case':<14}" + "".join(f"{n:>{width + 2}}" for n in names[1:]))
    for case, values in per_case.items():
        print(f"  {case:<14}" + "".join(f"{v:>{width + 2}.3f}" for v in values))
    print(f"  {'mean':<14}" + "".join(f"{v:>{width + 2}.3f}" for v in per_class) + f"   (mean of classes {mean:.3f})")
    print(f"\nrun folder:   {output / 'run'} (bundle, checkpoints, curves, per-case Dice)")
    print(f"overlays:     {output / 'overlays'}")
    print(f"MLflow run:   {result.run_id} in experiment '{cfg.experiment}' at {result.tracking_uri}")
    ui = f"mlflow ui --backend-store-uri {result.tracking_uri}" if result.tracking_uri.startswith("sqlite") else None
    if ui:
        print(f"open the UI:  .venv/bin/{ui} --host 127.0.0.1 --port 5000   then browse http://127.0.0.1:5000")
    print(f"finished in {seconds / 60:.1f} min")
    return DemoResult(output, result.run_id, result.tracking_uri, test_dice, per_case, seconds)
