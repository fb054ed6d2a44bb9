"""What a person reads beside the mask, drawn from the prediction and the CT it was made from: the statistics
(pipeline/statistics.py), the preview (pipeline/preview.py) and the overlay with the attention-gate map
(pipeline/plots.py). Each is asked for by its own option of `seg3d infer`; matplotlib is imported only to draw."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.statistics import structure_statistics, write_case_statistics

if TYPE_CHECKING:
    from pipeline.case_outputs import CaseOutputs
    from pipeline.imageio import Volume
    from pipeline.predict import Prediction
    from pipeline.transforms import Preprocessing


def write_readings(
    pred: Prediction, image: Volume, plan: CaseOutputs, *, case: str, pre: Preprocessing, model: str
) -> list[dict] | None:
    """The case's statistics (JSON, CSV), preview and overlay, as `plan` asks; returns the statistics rows."""
    rows = None
    if plan.statistics is not None or plan.preview is not None:
        rows = structure_statistics(
            image.array, pred.labels, image.affine, names=pre.label_names, values=pre.label_values
        )
    if plan.statistics is not None:
        write_case_statistics(rows, case=case, json_path=plan.statistics, csv_path=plan.statistics_csv)
    if plan.preview is not None:
        from pipeline.preview import preview_png

        preview_png(
            plan.preview,
            image=image.array,
            labels=pred.labels,
            affine=image.affine,
            names=pre.label_names,
            rows=rows,
            case=case,
            model=model,
        )
    if plan.overlay is not None:
        from pipeline.plots import overlay_png

        found = ", ".join(f"{n} {int((pred.labels == i).sum()):,} voxels" for i, n in enumerate(pre.label_names) if i)
        overlay_png(
            plan.overlay,
            image.array,
            image.affine,
            None,
            pred.labels,
            pre.label_names,
            title=f"{case}: {model} ({found})",
            extra=pred.gate,
            extra_name="attention gate (finest skip)",
        )
    return rows
