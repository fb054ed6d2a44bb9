"""Training: `train(cfg, data, output)`, what `seg3d train` calls and what tests call directly.

config -> datalist + integrity check -> split -> statistics -> transforms -> cached dataset and loader -> model
-> DiceCE (+ the variant's auxiliary losses) -> AdamW/SGD with a poly or cosine schedule, mixed precision,
gradient clipping -> validation on whole volumes with the Predictor that inference uses -> checkpoints,
bundle, MLflow.

The steps, each in a module of its own:
    pipeline/run_start.py   rank 0 plans the run (lock, checks, split, preprocessing), then starts it in MLflow
    pipeline/run_folder.py  RUN_DIR: the lock, the refusal of a used folder, resume checks, the run's files
    pipeline/rank_setup.py  each rank's model, optimiser (pipeline/optimizer.py) and data (pipeline/train_data.py)
    pipeline/epochs.py      the epoch loop: steps, validation, early stop, checkpoints
    pipeline/run_end.py     rank 0: bundle, per-case table, plots, MLflow artifacts and registration

Distributed: under torchrun every rank runs `train`; see pipeline/distributed.py and `train`'s docstring.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

from pipeline.config import Config, config_from_dict
from pipeline.distributed import Dist
from pipeline.epochs import RunProgress, run_epochs
from pipeline.rank_setup import setup_rank, torch_settings_restored
from pipeline.run_end import TrainResult, finish_run
from pipeline.run_folder import removed_if_refused
from pipeline.run_start import plan_run, start_run
from pipeline.transforms import Preprocessing

__all__ = ["TrainResult", "train"]


def train(
    cfg: Config | None,
    data: Path | str,
    output: Path | str,
    tracking_uri: str | None = None,
    *,
    resume: bool = False,
    config_path: Path | str | None = None,
    progress: bool | None = None,
    tags: dict[str, str] | None = None,
    register: bool = True,
) -> TrainResult:
    """Train one fold into RUN_DIR `output`; see the module docstring. `cfg` may be None with resume=True (the
    stored config is used). `progress`: bars and epoch lines (None: only on a terminal).

    Under torchrun (WORLD_SIZE > 1) every rank calls this: rank 0 owns RUN_DIR (lock, files, checkpoints, bundle)
    and the MLflow run; all ranks train a DistributedDataParallel copy on their own share of the cases. After
    torchrun restarted the group (TORCHELASTIC_RESTART_COUNT > 0), a run folder that already holds this run is
    resumed from its last checkpoint. Every rank returns rank 0's report of the run with its own network and cases.

    `tags` are added to the MLflow run's tags (`seg3d study` sets the parent run); `register=False` leaves the bundle
    out of the model registry (a study registers only its champion).

    The process's thread count and cuDNN flags, which training sets, are as they were when this returns or raises.
    """
    dist = Dist.from_env()
    run_dir = Path(output)
    dist.init()
    try:
        with (
            torch_settings_restored(),
            removed_if_refused(run_dir, owner=dist.is_main),
            contextlib.ExitStack() as stack,  # holds RUN_DIR's lock on rank 0
        ):
            plan, context = dist.on_main(
                lambda: plan_run(
                    stack=stack,
                    cfg=cfg,
                    data=Path(data),
                    run_dir=run_dir,
                    tracking_uri=tracking_uri,
                    resume=resume,
                    world=dist.world,
                ),
                share=lambda both: (both[0], None),  # the plan goes to every rank, the run context stays on rank 0
            )
            cfg = context.cfg if context else config_from_dict(plan.config, str(run_dir / "config.yaml"))
            pre = Preprocessing.from_json(plan.preprocessing)
            setup = dist.agree(lambda: setup_rank(dist=dist, cfg=cfg, plan=plan, pre=pre, run_dir=run_dir))
            done = RunProgress.from_checkpoint(plan.state)
            # (after the checkpoint's history told the tracker which epochs a crash kept from the store)
            dist.on_main(
                lambda: start_run(
                    dist=dist,
                    context=context,
                    plan=plan,
                    setup=setup,
                    run_dir=run_dir,
                    data=Path(data),
                    config_path=config_path,
                    extra_tags=tags,
                )
            )
            plan.state = None  # the weights live in the model and optimiser now; do not hold a second copy
            tracker = context.tracker if context else None
            try:
                done = run_epochs(
                    dist=dist,
                    cfg=cfg,
                    setup=setup,
                    start=done,
                    class_names=plan.class_names,
                    val_cases=plan.split["val"],
                    run_dir=run_dir,
                    tracker=tracker,
                    show=progress if dist.is_main else False,
                )
                result = dist.on_main(
                    lambda: finish_run(
                        cfg=cfg,
                        run_dir=run_dir,
                        model=setup.model,
                        pre=pre,
                        device=setup.device,
                        tracker=tracker,
                        done=done,
                        class_names=plan.class_names,
                        val_records=plan.val_records,
                        split=plan.split,
                        register=register,
                    )
                )
            except BaseException as e:
                if tracker is not None:
                    tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
                raise
            return replace(
                result,
                history=done.history,
                epochs=len(done.history),
                model=setup.model,
                rank=dist.rank,
                world=dist.world,
                train_cases=[r["case"] for r in setup.train_ds.data],
                val_cases=[r["case"] for r in getattr(setup.val_ds, "data", [])],
            )
    finally:
        dist.close()
