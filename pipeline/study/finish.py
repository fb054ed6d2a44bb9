"""The end of a study: costs, statistics and report, the champion bundle and its registration, all in the parent run.

Runs when no job is missing (or on `--report-only`, with whatever is done). Costs are measured once per variant on
the study's device and kept in STUDY_DIR/costs.json. The champion is the winning candidate's fold models (every
member variant's, every seed's), packed as one ensemble bundle (pipeline/ensemble.py) that `seg3d infer` averages in
probability space, and registered with the alias `champion`; champion.json records what was registered, so a rerun
does not register the same champion twice.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from pipeline.datalists import Dataset
from pipeline.fileio import atomic_write_text
from pipeline.study.analysis import analyse, complete_variants
from pipeline.study.config import StudyConfig
from pipeline.study.jobs import all_jobs, missing_jobs
from pipeline.study.results import StudyResults

COSTS, CHAMPION = "costs.json", "champion"


def device_words(device: str) -> str:
    import torch

    from pipeline.devices import cpu_info

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU: {cpu_info()[0]}, {torch.get_num_threads()} threads"


def variant_costs(cfg: StudyConfig, study_dir: Path, *, variants: list[str], device: str, num_classes: int) -> dict:
    """Each variant's costs on `device`, measured once and cached (keyed by the study and the device)."""
    from pipeline.study.costs import measure_costs

    path = study_dir / COSTS
    key = f"{cfg.fingerprint()}@{device_words(device)}"
    cached = json.loads(path.read_text()) if path.is_file() else {}
    table = cached.get("costs", {}) if cached.get("key") == key else {}
    for v in variants:
        if v not in table:
            job_cfg = cfg.job_config(v, fold=0, seed=cfg.seeds[0])
            table[v] = measure_costs(job_cfg, num_classes=num_classes, device=device)
            atomic_write_text(path, json.dumps({"key": key, "costs": table}, indent=2))
    return {v: table[v] for v in variants}


def finish_study(
    cfg: StudyConfig, *, dataset: Dataset, study_dir: Path, split: dict, tracker, device: str, outcome, say=print
) -> StudyResults:
    from pipeline.study.report import write_report

    scores, ranking = analyse(cfg, dataset=dataset, study_dir=study_dir, split=split, say=say)
    variants = complete_variants(cfg, study_dir)
    results = StudyResults(
        name=cfg.name,
        baseline=cfg.baseline,
        classes=dataset.class_names[1:],
        selection_class=cfg.select.class_name,
        scores=scores,
        costs=variant_costs(cfg, study_dir, variants=variants, device=device, num_classes=len(dataset.class_names)),
        ranking=ranking,
        missing_jobs=[j.id for j in missing_jobs(cfg, study_dir)],
        hardware=device_words(device),
        date=date.today().isoformat(),
        seconds={j.id: d["train_seconds"] for j in all_jobs(cfg) if (d := j.done(study_dir)) is not None},
    )
    report_dir = study_dir / "report"
    paths = write_report(results, report_dir)
    outcome.report = report_dir / "report.md"
    tracker.log_artifacts(report_dir, "report")
    if ranking:
        outcome.winner = ranking[0]
        tracker.set_tags({"seg3d.winner": _winner_text(ranking[0])})
        tracker.log_metrics({"winner_score": ranking[0]["score"]}, step=0)
    say(f"study {cfg.name}: report {outcome.report} ({len(paths)} files)")
    if results.missing_jobs:
        say(
            f"study {cfg.name}: {len(results.missing_jobs)} job(s) missing, no champion yet: "
            f"{', '.join(results.missing_jobs[:8])}{' ...' if len(results.missing_jobs) > 8 else ''}"
        )
        return results
    if ranking:
        champion(cfg, study_dir=study_dir, winner=ranking[0], tracker=tracker, outcome=outcome, say=say)
    return results


def _winner_text(winner: dict) -> str:
    return f"{winner['candidate']}{' +postprocess' if winner['postprocess'] else ''} ({winner['score']:.4f})"


def champion(cfg: StudyConfig, *, study_dir: Path, winner: dict, tracker, outcome, say=print) -> None:
    """Pack the winner's fold models as one ensemble bundle and register it with the alias `champion` (once)."""
    from pipeline.ensemble import save_ensemble

    members = {j.id: j.run_dir(study_dir) / "bundle" for j in all_jobs(cfg) if j.variant in winner["members"]}
    record = {"winner": winner, "members": sorted(members)}
    marker = study_dir / "champion.json"
    folder = study_dir / CHAMPION
    stored = json.loads(marker.read_text()) if marker.is_file() else {}
    outcome.champion = folder
    if stored.get("winner") == winner and stored.get("members") == record["members"] and folder.is_dir():
        outcome.registered_version = stored.get("version")
        say(f"study {cfg.name}: champion {_winner_text(winner)} already packed and registered")
        return
    save_ensemble(
        folder,
        members,
        postprocess=winner["postprocess"],
        provenance={"study": cfg.name, "winner": winner, "mlflow_run_id": tracker.run_id},
    )
    tracker.make_model(folder, "ensemble")
    tracker.log_artifacts(folder, CHAMPION)
    version = tracker.register_model(CHAMPION, cfg.registered_model, alias="champion")
    outcome.registered_version = version
    atomic_write_text(marker, json.dumps({**record, "version": version}, indent=2))
    say(
        f"study {cfg.name}: champion {_winner_text(winner)}, {len(members)} fold model(s) in {folder}"
        + (f", registered as models:/{cfg.registered_model}@champion (version {version})" if version else "")
    )
