"""CT phantom generator in Medical Segmentation Decathlon layout (Task07_Pancreas: 0 background, 1 pancreas,
2 cancer).

Anatomy is laid out in "body millimetres" of an adult abdomen (x to the patient's right, y anterior,
z superior, origin at the pancreatic body) and scaled as a whole to the case's field of view, so every organ
keeps its place relative to the others whatever the voxel size. HU values are portal-venous-phase values.
The pancreas is deliberately as bright as liver and spleen, and decoys with its intensity and texture sit in
the wrong places: intensity alone cannot find it, context can. Where the decoys are is written beside each case
(decoysTr/, decoysTs/: 1 = decoy voxel), so that a study can count how much of them a model labels pancreas.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage

from pipeline.errors import Seg3dError
from pipeline.fileio import atomic_write, atomic_write_text, require_output_folder

LABELS = {"0": "background", "1": "pancreas", "2": "cancer"}
MAX_CASES = 10_000
ORIENTATIONS = ("RAS", "LPS", "LAS")
DECOY_KINDS = ("classic", "matched")  # matched: see pipeline.phantom_decoys

HU = {
    "air": -1000.0,
    "fat": -95.0,
    "muscle": 50.0,
    "liver": 105.0,
    "spleen": 112.0,
    "kidney": 175.0,
    "aorta": 180.0,
    "ivc": 130.0,
    "stomach_wall": 60.0,
    "fluid": 15.0,
    "bowel_wall": 45.0,
    "cancellous": 250.0,
    "cortical": 900.0,
    "csf": 15.0,
    "pancreas": 105.0,
    "tumour": 45.0,
}


@dataclass(frozen=True)
class CaseSpec:
    """What varies between phantom cases; drawn from the case's own seed."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str
    tumour: bool
    decoys: int


def draw_spec(rng: np.random.Generator, index: int = 0) -> CaseSpec:
    """Case `index`'s sizes and spacing from its seed; every second case is stored LPS or LAS, in turn."""
    inplane = int(rng.choice([128, 144, 160, 176, 192]))
    return CaseSpec(
        shape=(inplane, inplane, int(rng.integers(40, 81))),
        spacing=(round(float(rng.uniform(0.6, 1.0)), 3),) * 2 + (round(float(rng.uniform(1.5, 5.0)), 2),),
        orientation=("RAS", "LPS", "RAS", "LAS")[index % 4],
        tumour=bool(rng.random() < 0.6),
        decoys=int(rng.integers(2, 5)),
    )


def bezier(p0, p1, p2, n: int = 48) -> np.ndarray:
    """n points of the quadratic Bezier curve from p0 to p2 pulled towards p1 (all in one plane)."""
    t = np.linspace(0.0, 1.0, n)[:, None]
    return (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # (n, 3)


class _Grid:
    """Body-mm coordinates of every voxel, as broadcastable axes (x: (X,1,1), y: (1,Y,1), z: (1,1,Z))."""

    def __init__(self, shape, spacing, scale: float):
        axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * sp / scale for n, sp in zip(shape, spacing)]
        self.x, self.y, self.z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
        self.shape = tuple(shape)
        self.axes = axes

    def ellipsoid(self, centre, radii) -> np.ndarray:
        (cx, cy, cz), (rx, ry, rz) = centre, radii
        return ((self.x - cx) / rx) ** 2 + ((self.y - cy) / ry) ** 2 + ((self.z - cz) / rz) ** 2 <= 1.0

    def cylinder(self, centre_xy, radius, z_range=(-1e9, 1e9)) -> np.ndarray:
        inside = (self.x - centre_xy[0]) ** 2 + (self.y - centre_xy[1]) ** 2 <= radius**2
        return inside & (self.z >= z_range[0]) & (self.z <= z_range[1])

    def tube(self, points: np.ndarray, radii: np.ndarray) -> np.ndarray:
        """Voxels within radii[k] of some curve point k, computed inside the curve's bounding box only."""
        out = np.zeros(self.shape, dtype=bool)
        lo, hi = points.min(0) - radii.max(), points.max(0) + radii.max()
        box = []
        for axis, (a, b) in zip(self.axes, zip(lo, hi)):
            idx = np.nonzero((axis >= a) & (axis <= b))[0]
            if idx.size == 0:
                return out
            box.append(slice(idx[0], idx[-1] + 1))
        bx, by, bz = (ax[s] for ax, s in zip(self.axes, box))
        gx, gy, gz = bx[:, None, None], by[None, :, None], bz[None, None, :]
        inside = np.zeros((len(bx), len(by), len(bz)), dtype=bool)
        for (px, py, pz), r in zip(points, radii):
            inside |= (gx - px) ** 2 + (gy - py) ** 2 + (gz - pz) ** 2 <= r * r
        out[tuple(box)] = inside
        return out


def _texture(rng: np.random.Generator, shape, sigma_vox) -> np.ndarray:
    """Smooth zero-mean, unit-std noise: parenchymal texture and lobulation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox)
    return field / (field.std() + 1e-6)


class Phantom(NamedTuple):
    """One phantom case, arrays in RAS voxel order."""

    image: np.ndarray  # int16 HU
    label: np.ndarray  # uint8: 0 background, 1 pancreas, 2 cancer
    affine: np.ndarray  # 4x4, voxel -> RAS mm
    decoys: np.ndarray  # uint8: 1 where a decoy was painted (pancreas-like tissue where no pancreas belongs)


def make_phantom(rng: np.random.Generator, spec: CaseSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom in RAS voxel order: (image int16 HU, label uint8, 4x4 RAS affine); make_case adds the decoys."""
    image, label, affine, _ = make_case(rng, spec)
    return image, label, affine


def make_case(rng: np.random.Generator, spec: CaseSpec, *, decoys: str = "classic") -> Phantom:
    """One phantom case with its decoy mask. The mask is only recorded: image and label are those make_phantom has
    always drawn from the same seed, since published benchmark numbers were measured on them.

    `decoys="matched"` draws decoys that match the gland's length and surroundings too (pipeline.phantom_decoys);
    anatomy, label and noise are those of "classic": only the decoys and what they paint round them differ.
    """
    if decoys not in DECOY_KINDS:
        raise Seg3dError(f"decoys must be one of {', '.join(DECOY_KINDS)}, got {decoys!r}")
    # Separate streams, so that the number of decoys changes neither the anatomy nor the noise.
    rng, decoy_rng, noise_rng = rng.spawn(3)
    fov = spec.shape[0] * spec.spacing[0]
    scale = fov / 360.0 * rng.uniform(0.92, 1.05)  # world mm per body mm: the body fills ~90% of the FOV
    g = _Grid(spec.shape, spec.spacing, scale)
    j = lambda s=0.08: rng.uniform(1 - s, 1 + s)  # noqa: E731  (organ-size jitter)
    sh = lambda s=6.0: rng.uniform(-s, s)  # noqa: E731  (organ-position jitter in body mm)

    img = np.full(spec.shape, HU["air"], dtype=np.float32)
    ax, ay = 165 * j(0.05), 120 * j(0.05)
    body = (g.x / ax) ** 2 + (g.y / ay) ** 2 <= 1.0
    body = np.broadcast_to(body, spec.shape)
    inner_wall = (g.x / (ax - 14)) ** 2 + (g.y / (ay - 14)) ** 2 <= 1.0
    cavity = (g.x / (ax - 24)) ** 2 + (g.y / (ay - 24)) ** 2 <= 1.0
    img[body] = HU["fat"]
    img[np.broadcast_to(inner_wall & ~cavity, spec.shape) & body] = HU["muscle"]

    def paint(mask, hu, texture_std=0.0):
        m = np.broadcast_to(mask, spec.shape) & body
        img[m] = hu if texture_std == 0 else hu + texture_std * tex[m]

    tex = _texture(rng, spec.shape, 1.5)
    # Spine, canal and back muscles (posterior), great vessels in front of the spine.
    paint(g.ellipsoid((35, -95, 0), (25, 18, 1e4)) | g.ellipsoid((-35, -95, 0), (25, 18, 1e4)), HU["muscle"], 6)
    paint(g.cylinder((0, -75), 22), HU["cortical"])
    paint(g.cylinder((0, -75), 19), HU["cancellous"], 25)
    paint(g.cylinder((0, -103), 8), HU["csf"])
    aorta_xy = (-15 + sh(3), -42 + sh(3))
    paint(g.cylinder(aorta_xy, 12 * j()), HU["aorta"], 5)
    paint(g.cylinder((27 + sh(3), -36 + sh(3)), 13 * j()), HU["ivc"], 5)
    # Solid organs.
    paint(g.ellipsoid((70 + sh(), 12 + sh(), 45 + sh()), (85 * j(), 88 * j(), 100 * j())), HU["liver"], 8)
    paint(g.ellipsoid((-95 + sh(), -38 + sh(), 50 + sh()), (30 * j(), 50 * j(), 60 * j())), HU["spleen"], 8)
    for side in (1, -1):
        paint(g.ellipsoid((side * 72 + sh(), -55 + sh(), -40 + sh()), (25 * j(), 34 * j(), 55 * j())), HU["kidney"], 10)
    # Stomach: wall, fluid, and air rising anteriorly (supine patient).
    st_c, st_r = (-55 + sh(), 45 + sh(), 72 + sh()), (50 * j(), 40 * j(), 50 * j())
    paint(g.ellipsoid(st_c, st_r), HU["stomach_wall"], 4)
    lumen = g.ellipsoid(st_c, tuple(r - 6 for r in st_r))
    paint(lumen, HU["fluid"], 4)
    paint(lumen & (g.y > st_c[1] + 12), HU["air"])

    # Pancreas: head by the duodenum right of the vessels, body over the aorta, tail at the splenic hilum.
    p0 = np.array([42 + sh(), 6 + sh(), -14 + sh(4)])
    p1 = np.array([0 + sh(), 24 + sh(), 0 + sh(4)])
    p2 = np.array([-78 + sh(), -22 + sh(), 16 + sh(4)])
    curve = bezier(p0, p1, p2)
    radii = np.linspace(14 * j(0.1), 8 * j(0.1), len(curve))
    # Duodenum: a C-loop hugging the pancreatic head on its right.
    angles = np.linspace(-0.6 * np.pi, 0.75 * np.pi, 32)
    duo = np.stack([p0[0] + 28 * np.cos(angles), p0[1] + 26 * np.sin(angles), p0[2] - 12 + 20 * angles / np.pi], 1)
    duo_mask = g.tube(duo, np.full(len(duo), 10.0))
    paint(duo_mask, HU["bowel_wall"], 4)
    paint(g.tube(duo, np.full(len(duo), 6.0)), HU["fluid"], 4)

    lobules = _texture(rng, spec.shape, 1.0)

    def paint_pancreas_like(mask):
        m = mask & body
        img[m] = HU["pancreas"] + 12 * lobules[m]
        img[m & (lobules < -1.6)] = HU["fat"] * 0.4  # fatty clefts between lobules

    # Peripancreatic fat: a plane of retroperitoneal fat separates the gland from liver, spleen and bowel, as in
    # real CT; without it the gland would sit inside the liver and spleen ellipsoids with no visible border.
    paint(g.tube(curve, radii + 4.0) & ~duo_mask, HU["fat"], 6)
    pancreas = g.tube(curve, radii) & ~duo_mask
    paint_pancreas_like(pancreas)
    label = np.zeros(spec.shape, dtype=np.uint8)
    label[pancreas & body] = 1

    if spec.tumour:
        k = int(rng.integers(2, len(curve) * 2 // 3))
        centre = curve[k] + rng.uniform(-0.3, 0.3, 3) * radii[k]
        tumour = g.ellipsoid(centre, tuple(rng.uniform(0.5, 0.9) * radii[k] * j(0.2) for _ in range(3))) & pancreas
        img[tumour] = HU["tumour"] + 8 * tex[tumour]
        label[tumour] = 2

    if decoys == "matched" and spec.decoys:
        # Imported here: pipeline.phantom_decoys imports this module's HU table and curves.
        from pipeline.phantom_decoys import Scene, paint_matched_decoys

        scene = Scene(
            image=img,
            grid=g,
            body=body,
            cavity=(ax - 24, ay - 24),
            avoid=[(curve, radii + 4.0), (duo, np.full(len(duo), 10.0))],  # the gland's fat plane, duodenum
            texture=tex,
            paint_pancreas_like=paint_pancreas_like,
        )
        decoy_mask = paint_matched_decoys(decoy_rng, count=spec.decoys, scene=scene)
    else:
        # Classic decoys: short pancreas-like tubes where no pancreas belongs (anterior fat, flank, pelvis, beside
        # the liver).
        sites = [(0, 80, -60), (-110, 20, -70), (20, 40, -150), (95, -20, -110), (-30, 70, 120)]
        decoy_mask = np.zeros(spec.shape, dtype=bool)
        for idx in decoy_rng.permutation(len(sites))[: spec.decoys]:
            c = np.array(sites[idx], dtype=float) + decoy_rng.uniform(-8, 8, 3)
            d = decoy_rng.normal(size=3)
            d /= np.linalg.norm(d)
            pts = bezier(c - 25 * d, c + decoy_rng.uniform(-10, 10, 3), c + 25 * d, n=24)
            decoy = g.tube(pts, np.linspace(11, 7, len(pts))) & (label == 0)
            paint_pancreas_like(decoy)
            decoy_mask |= decoy & body  # exactly the voxels paint_pancreas_like changed

    # Partial volume (half a voxel of blur per axis), then quantum noise.
    img = ndimage.gaussian_filter(img, sigma=0.5)
    img += noise_rng.normal(0.0, noise_rng.uniform(8, 15), size=img.shape).astype(np.float32)
    image = np.clip(np.rint(img), -1024, 3071).astype(np.int16)

    affine = np.diag([*spec.spacing, 1.0])
    affine[:3, 3] = [-(n - 1) / 2 * sp for n, sp in zip(spec.shape, spec.spacing)]
    return Phantom(image=image, label=label, affine=affine, decoys=decoy_mask.astype(np.uint8))


def to_nifti(array: np.ndarray, affine: np.ndarray, orientation: str) -> nib.Nifti1Image:
    """A NIfTI image of RAS-ordered `array`, stored in `orientation` with qform and sform saying so."""
    img = nib.Nifti1Image(array, affine)
    if orientation != "RAS":
        transform = nib.orientations.ornt_transform(
            nib.orientations.axcodes2ornt(("R", "A", "S")), nib.orientations.axcodes2ornt(tuple(orientation))
        )
        img = img.as_reoriented(transform)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.set_data_dtype(array.dtype)
    return img


def save_atomic(img: nib.Nifti1Image, path: Path) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half a file."""
    atomic_write(path, lambda tmp: nib.save(img, tmp), suffix=".nii.gz")


def synthesize(
    out: Path,
    cases: int,
    seed: int = 0,
    test_cases: int | None = None,
    overwrite: bool = False,
    decoys: str = "classic",
) -> Path:
    """Write `cases` training and `test_cases` test phantoms in MSD layout under `out`; returns dataset.json.

    Test labels go to `labelsTs/` (not part of the MSD layout, which withholds them) so that inference can
    be scored on the phantom test set. Each case's decoy mask (uint8, 1 = decoy voxel, the image's geometry) goes to
    `decoysTr/` or `decoysTs/`: training entries name it under "decoy"; a test case's is found by its name, as its
    label in `labelsTs/` is. `decoys` is "classic" or "matched" (see make_case); dataset.json records it and the seed
    under "seg3d_phantom", so that a study on the data says which phantom it ran on.
    """
    if decoys not in DECOY_KINDS:
        raise Seg3dError(f"--decoys must be one of {', '.join(DECOY_KINDS)}, got {decoys!r}")
    if not 1 <= cases <= MAX_CASES:
        raise Seg3dError(f"--cases must be 1..{MAX_CASES}, got {cases}")
    test_cases = max(1, cases // 4) if test_cases is None else test_cases
    if not 0 <= test_cases <= MAX_CASES:
        raise Seg3dError(f"--test-cases must be 0..{MAX_CASES}, got {test_cases}")
    if not 0 <= seed < 2**63:
        raise Seg3dError(f"--seed must be a whole number from 0 to 2**63 - 1, got {seed}")
    out = Path(out)
    manifest = out / "dataset.json"
    if manifest.exists() and not overwrite:
        raise Seg3dError(f"{manifest} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise Seg3dError(f"--out {out} is a file; give a folder for the dataset")
    # About 4 MB per case as written (int16 image and uint8 label, gzip), with room to spare.
    require_output_folder(out, need_bytes=8 * 2**20 * (cases + test_cases), what="--out")
    for sub in ("imagesTr", "labelsTr", "decoysTr", "imagesTs", "labelsTs", "decoysTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    training, test = [], []
    for index in range(cases + test_cases):
        case = f"pancreas_{index + 1:03d}"
        rng = np.random.default_rng([seed, index])
        spec = draw_spec(rng, index)
        image, label, affine, decoy_mask = make_case(rng, spec, decoys=decoys)
        split = ("Tr", training) if index < cases else ("Ts", test)
        save_atomic(to_nifti(image, affine, spec.orientation), out / f"images{split[0]}" / f"{case}.nii.gz")
        save_atomic(to_nifti(label, affine, spec.orientation), out / f"labels{split[0]}" / f"{case}.nii.gz")
        save_atomic(to_nifti(decoy_mask, affine, spec.orientation), out / f"decoys{split[0]}" / f"{case}.nii.gz")
        if split[0] == "Tr":
            training.append(
                {
                    "image": f"./imagesTr/{case}.nii.gz",
                    "label": f"./labelsTr/{case}.nii.gz",
                    "decoy": f"./decoysTr/{case}.nii.gz",
                }
            )
        else:
            test.append(f"./imagesTs/{case}.nii.gz")

    matched = ", matched to the pancreas in length and surroundings" if decoys == "matched" else ""
    dataset = {
        "name": "Pancreas",
        "description": f"seg3d synthetic CT phantom (pancreas and pancreatic tumour, with context decoys{matched})",
        "reference": "seg3d pipeline.synthetic",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": LABELS,
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
        "seg3d_phantom": {"seed": seed, "decoys": decoys},
    }
    atomic_write_text(manifest, json.dumps(dataset, indent=4))
    return manifest
