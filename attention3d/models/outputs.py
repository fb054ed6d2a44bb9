"""The declared auxiliary outputs of a model: what each extra training output is, so that a loss can pick its term
by kind instead of reading the output's name.

A model with auxiliaries lists them in `model.aux_outputs`, in the order its train-mode forward returns them after
the main logits; `model.output_names` is `["logits", *(a.name for a in model.aux_outputs)]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# deep_supervision: class logits of a coarser decoder level (Lee et al. 2015, deeply-supervised nets);
# branch_logits: class logits of one branch of a context module (DANet's PAM and CAM branches);
# class_presence: one logit per class for "is this class anywhere in the patch" (EncNet's SE-loss).
AuxKind = Literal["deep_supervision", "branch_logits", "class_presence"]
AUX_KINDS: tuple[str, ...] = get_args(AuxKind)


@dataclass(frozen=True)
class AuxOutput:
    """One auxiliary training output.

    `name` is unique within a model ("ds1", "pam4", "se4"); `level` is the U-Net level it is read at (0 = finest);
    `source` is the context module's name for the output ("pam", "cam", "se"), empty for deep supervision.
    Spatial kinds are (B, out_channels, *S) at the input's resolution; class presence is (B, out_channels).
    """

    name: str
    kind: AuxKind
    level: int
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in AUX_KINDS:
            raise ValueError(f"auxiliary output {self.name!r}: kind must be one of {AUX_KINDS}, got {self.kind!r}")

    @property
    def spatial(self) -> bool:
        return self.kind != "class_presence"
