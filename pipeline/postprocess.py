"""Post-processing of a predicted label map, as configured by `PostprocessConfig` (the `postprocess:` section).

Two rules, both on connected components (6-connectivity, scipy.ndimage) and both optional:
- the largest connected component of all foreground classes taken together is kept, the rest becomes background:
  a pancreas and the tumour inside it are one structure, and a second "pancreas" elsewhere is a false positive;
- `inside`: a component of one class (the tumour) survives only where it overlaps or touches another class (the
  organ it grows in); a tumour predicted far from any pancreas is a false positive.

Which class must lie inside which is configuration, resolved here against the model's class names once, when a
Predictor is built; an unknown name is an error there rather than a rule silently never applied.
"""

from __future__ import annotations

import numpy as np

from pipeline.config import PostprocessConfig
from pipeline.errors import Seg3dError, shown

# What `inside: null` stands for (and `tumour_inside_pancreas: true` in bundles written before `inside` existed):
# the tumour class of MSD Task07 ("cancer") and its other spellings inside the pancreas, matched in any case,
# applied only where the model has both classes (a pancreas-only model has no tumour rule).
DEFAULT_INSIDE = {"cancer": "pancreas", "tumour": "pancreas", "tumor": "pancreas"}


def inside_rules(cfg: PostprocessConfig, names: list[str]) -> list[tuple[int, int]]:
    """(class, class it must lie inside or touch) index pairs for a model with the class names `names`
    (background first). Raises Seg3dError for a configured name the model does not have."""
    if cfg.inside is None:
        lower = [n.lower() for n in names]
        return [
            (i, lower.index(organ))
            for i, name in enumerate(lower)
            if i > 0 and (organ := DEFAULT_INSIDE.get(name)) is not None and organ in lower
        ]
    rules = []
    for tumour, organ in cfg.inside.items():
        for name in (tumour, organ):
            if name not in names[1:]:
                what = "is the background" if names and name == names[0] else "is not a class of this model"
                raise Seg3dError(
                    f"postprocess.inside names {shown(name)}, which {what}; the model's foreground classes are "
                    f"{', '.join(names[1:])}. Fix postprocess.inside in the config (or run with --no-postprocess)"
                )
        rules.append((names.index(tumour), names.index(organ)))
    return rules


def postprocess(labels: np.ndarray, names: list[str], cfg: PostprocessConfig) -> np.ndarray:
    """`labels` (class indices, background 0) after the rules of `cfg`, for a model with the class names `names`.

    Works inside the foreground's bounding box: on a 512 x 512 x 1000 CT the pancreas is a small part of the
    volume. The `inside` rule sees the labels after the largest-component rule, and each rule the labels the rules
    before it left."""
    # One definition, shared with the exported MONAI Bundle, whose scripts/postprocess.py is that module's file.
    from pipeline.monai_bundle_postprocess import keep_components

    rules = inside_rules(cfg, names)
    return keep_components(labels, cfg.largest_component, [list(rule) for rule in rules])
