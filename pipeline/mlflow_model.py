"""A seg3d bundle as an MLflow pyfunc model: `mlflow.pyfunc.load_model("models:/NAME@ALIAS").predict(table)`.

The bundle folder is the model: training writes an `MLmodel` file into it (pipeline/tracking/pyfunc.py) whose
python_function flavour names this module as its loader, so MLflow loads the bundle's own weights, with no second
copy and nothing unpickled (a loader module, not a pickled PythonModel). An ensemble folder (the study's champion)
loads the same way.

It works on files, as `seg3d infer` does, because a CT is a file (or a DICOM series) with a geometry, and the mask
must land in that geometry:

    input   a table with the columns `image`: a CT (NIfTI file, DICOM series folder or zip) and `output`: where its
            mask goes, a .nii.gz file or a folder (then FOLDER/CASE.nii.gz), as `seg3d infer --output` takes it
    output  a table with the columns `image` (as given), `mask` (the path written; empty when the row failed) and
            `error` (one line naming the problem; empty when the row succeeded)

Every row runs `seg3d infer`'s own path (pipeline/infer.run_inference with the loaded model), so the mask is the
file `seg3d infer --model M --input IMAGE --output OUTPUT --overwrite` writes; one failing row does not stop the
others. The table's schema is the model's signature, recorded in MLmodel, so MLflow checks it before `predict`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipeline.errors import Seg3dError, one_line

INPUT_COLUMNS = ("image", "output")
OUTPUT_COLUMNS = ("image", "mask", "error")


def _load_pyfunc(path: str) -> Seg3dModel:
    """MLflow's hook for a loader module: the model in the downloaded folder `path`."""
    return Seg3dModel(Path(path))


class Seg3dModel:
    """The loaded bundle (or ensemble); `predict` runs each row of the input table as `seg3d infer` would."""

    def __init__(self, folder: Path):
        from pipeline.ensemble import load_model

        self.folder = Path(folder)
        self.model = load_model(self.folder)  # every check of load_bundle: a damaged bundle fails here, in one line

    def predict(self, model_input: Any, params: dict[str, Any] | None = None):
        import pandas as pd

        rows = _rows(model_input)
        result: dict[str, list[str]] = {column: [] for column in OUTPUT_COLUMNS}
        for image, output in rows:
            mask, error = "", ""
            try:
                mask = str(self._one(image, output))
            except Seg3dError as err:
                error = str(err)
            except OSError as err:  # the output's file system: full, gone, read-only
                error = f"{image}: cannot write {output} ({err.strerror or one_line(err)})"
            result["image"].append(image)
            result["mask"].append(mask)
            result["error"].append(error)
        return pd.DataFrame(result, columns=list(OUTPUT_COLUMNS))

    def _one(self, image: str, output: str) -> Path:
        from pipeline.infer import collect_inputs, run_inference

        if not image or not output:
            raise Seg3dError(f"row {image!r} -> {output!r}: both `image` and `output` must be given")
        with tempfile.TemporaryDirectory(prefix="seg3d-pyfunc-") as staging:
            cases = collect_inputs(image, staging=Path(staging))
        if len(cases) != 1:
            raise Seg3dError(
                f"{image} holds {len(cases)} CTs; the model takes one CT per row (one file, or one series folder)"
            )
        summary = run_inference(self.folder, image, output, bundle=self.model, overwrite=True, progress=False)
        if summary.failed:
            raise Seg3dError(summary.failed[0][1])
        return summary.outputs[summary.done[0]].labels


def _rows(model_input: Any) -> list[tuple[str, str]]:
    """(image, output) per row of a DataFrame or of a list of dicts, as text."""
    import pandas as pd

    table = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
    missing = [c for c in INPUT_COLUMNS if c not in table.columns]
    if missing:
        raise Seg3dError(
            f"the input table has no column {missing[0]!r}; give the columns {', '.join(INPUT_COLUMNS)} (a CT file or"
            " DICOM folder, and the .nii.gz file or folder its mask goes to)"
        )
    return [("" if pd.isna(i) else str(i), "" if pd.isna(o) else str(o)) for i, o in zip(table.image, table.output)]
