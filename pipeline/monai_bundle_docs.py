"""The human-readable files of an exported MONAI Bundle (pipeline/monai_bundle.py): docs/README.md and LICENSE."""

from __future__ import annotations

from pipeline.export import _bundle_info
from pipeline.postprocess import inside_rules


def readme(bundle, patch: tuple[int, int, int], source: str) -> str:
    """docs/README.md: what the bundle does, how to run it, what needs seg3d."""
    pre, cfg, name = bundle.preprocessing, bundle.config, bundle.config.model.name
    steps = "\n".join(f"{i}. {s}" for i, s in enumerate(_bundle_info(bundle, source)["preprocessing_steps"], 1))
    post = cfg.postprocess
    rules = [(pre.label_names[a], pre.label_names[b]) for a, b in inside_rules(cfg.postprocess, pre.label_names)]
    said = []
    if post.largest_component:
        said.append("the largest connected component of all foreground classes together is kept (6-connectivity)")
    said += [f"a {a} component that neither overlaps nor touches {b} is removed" for a, b in rules]
    postprocessing = "; ".join(said) if said else "none (the bundle was trained with post-processing off)"
    classes = "\n".join(f"| {i} | {n} | {v} |" for i, (n, v) in enumerate(zip(pre.label_names, pre.label_values)))
    return f"""# seg3d {name}: {", ".join(pre.label_names[1:])} in CT

Exported by `seg3d export --format monai-bundle` from `{source}`. Research use only.

## Run it

```bash
cd THIS_FOLDER
python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT
```

Every `*.nii.gz` and `*.nii` file in `IN` (a CT in Hounsfield units, any orientation) becomes `OUT/<name>_seg.nii.gz`,
a uint8 label map in the input's own voxel grid (same shape and affine). It needs torch, MONAI, nibabel and scipy;
seg3d is not needed. The network runs on the first GPU if there is one (`--device "$torch.device('cpu')"` forces the
CPU), in float32. Run from another folder with `--bundle_root THIS_FOLDER` added.

## Classes

| channel / label | class | value in the training labels |
| --- | --- | --- |
{classes}

## What inference.json does (the same steps as `seg3d infer`)

{steps}

Then the logits are blended over the windows (MONAI's SlidingWindowInferer, patch {list(patch)}, overlap
{cfg.inference.overlap}, Gaussian weights with sigma_scale {cfg.inference.sigma_scale}), turned into probabilities
(softmax), and brought back to the input's grid as seg3d does it (`scripts/postprocess.py` ResampleToInputd: MONAI's
SpatialResample from the network's grid straight onto the input's through the two affines, trilinear, with
background more than half a network voxel beyond the network's grid, in the air the body crop removed); the label is
the argmax. Post-processing
(`scripts/postprocess.py`, seg3d's rules): {postprocessing}. Setting `postprocess_largest_component` to false and
`postprocess_inside` to [] (e.g. `--postprocess_inside "[]"`) skips it, as `seg3d infer --no-postprocess` does.

Test-time augmentation (`seg3d infer --tta`), DICOM input and DICOM SEG / RTSTRUCT output are seg3d's, not part of
this bundle: give the bundle NIfTI files.

## The network

- `models/model.ts`: TorchScript, traced at the patch size {list(patch)} (input (batch, 1, X, Y, Z) float32, output
  logits (batch, {pre.num_classes}, X, Y, Z)); `configs/inference.json` loads it as `network_def`, so nothing of
  seg3d is needed. Checked against the PyTorch network before the bundle was written (`models/model.ts.json`).
- `models/model.pt`: the state dict of seg3d's `{name}` network. Building that network needs seg3d's
  `attention3d` package: seg3d's U-Net (its padding to the total stride, its attention plug points) is not one of
  `monai.networks.nets`, for this variant and every other. With seg3d installed:
  `attention3d.create_model("{name}", **metadata["seg3d"]["bundle_metadata"]["unet_config"])` and
  `load_state_dict(torch.load("models/model.pt", weights_only=True))`.

## Checks that ran

Before the folder was moved into place: `configs/inference.json` and `configs/metadata.json` were parsed by MONAI's
ConfigParser, the preprocessing and the inferer built, `network_def` loaded and run on a batch of two patches and
compared with the PyTorch network. `python -m monai.bundle verify_net_in_out network_def --meta_file
configs/metadata.json --config_file configs/inference.json` checks the network's input and output against
`network_data_format`; `verify_metadata` checks metadata.json against the model zoo's schema (it downloads the
schema, so it needs a network).
"""


LICENSE_TEXT = """SPDX-License-Identifier: Apache-2.0

The code and configuration of this bundle (configs/, scripts/) come from seg3d and are licensed under the Apache
License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0). Unless required by applicable law or agreed to in
writing, they are distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND.

The weights (models/) were trained by the user of seg3d on their data: the terms of that data (for the Medical
Segmentation Decathlon pancreas task, CC-BY-SA 4.0) apply to them. Not for clinical use.
"""
