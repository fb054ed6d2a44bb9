"""What a study measured, as plain records: the interface between the analysis (pipeline/study/analysis.py) and
the statistics and report (pipeline/study/stats.py, pipeline/study/report.py)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Score:
    """One out-of-fold case of one candidate, one foreground class: `seg3d evaluate`'s numbers."""

    candidate: str  # a variant label ("unet", "danet") or an ensemble of them joined by "+" ("danet+emanet")
    postprocess: bool  # the bundle's post-processing applied to the labels
    case: str
    fold: int
    class_name: str  # a foreground class, e.g. "pancreas"
    dice: float  # NaN where the class is absent from both reference and prediction
    hd95: float  # mm; NaN where undefined (as seg3d evaluate)
    nsd: float
    # Fraction of the case's decoy voxels labelled as this class (None: the dataset has no decoy masks). A decoy is
    # pancreas-like tissue where no pancreas belongs (seg3d synth): labelling it pancreas is a context error.
    decoy_confusion: float | None = None


@dataclass
class StudyResults:
    name: str  # the study's name (its config's `name`)
    baseline: str  # the variant every other one is tested against
    classes: list[str]  # foreground class names, in label order
    selection_class: str | None  # None: mean foreground Dice over classes selects; else that class's Dice
    scores: list[Score] = field(default_factory=list)
    # variant -> {"parameters", "gflops_per_patch", "ms_per_window", "train_s_per_iteration", "peak_train_mib"}
    costs: dict[str, dict[str, float]] = field(default_factory=dict)
    # Every candidate ranked best first: {"candidate", "postprocess", "members": [variant, ...], "score": float}
    ranking: list[dict] = field(default_factory=list)
    missing_jobs: list[str] = field(default_factory=list)  # job ids without out-of-fold predictions yet
    hardware: str = ""  # the device the costs were measured on, in words
    date: str = ""  # ISO date of the analysis
    seconds: dict[str, float] = field(default_factory=dict)  # job id -> training wall seconds
