"""Build the bundled brain demo pair from the MNI ICBM 2009a template that ships inside nilearn's wheel.

No openly licensed pair of brain MRIs from two subjects is available offline, and LPBA40 may not be redistributed,
so the brain sample pair is synthetic, with a known answer:

* the moving image is the skull-stripped MNI ICBM152 2009a nonlinear symmetric T1 template (nilearn's 1 mm copy),
  cropped to a 160×192×160 mm box around the brain (the field of view of the affinely pre-aligned LPBA40 volumes
  the brain model was trained on) and resampled to 1.5 mm;
* the fixed image is that template warped by a seeded random smooth deformation (a cubic B-spline with control
  points about 40 mm apart, up to a few millimetres) and a small random affine (±3 % scale/shear, ±3°), with a
  different intensity gamma and a little noise;
* labels: grey matter (1) and white matter (2) from the template's tissue probability maps (the larger of the
  two where it is at least 0.5), on the sample grid for the moving image and warped from there by the same
  transform (nearest neighbour) for the fixed image, so a perfect registration scores Dice 1;
* ``ground_truth_transform.h5``: the transform that maps fixed physical points to moving ones (ITK convention,
  LPS), i.e. what a perfect registration returns. ``iconreg demo`` reports the mean distance between the
  registration's forward transform and it inside the fixed brain.

Usage (writes ``Resources/SampleData/brain``)::

    pip download nilearn==0.14.1 --no-deps -d /tmp/nilearn && python scripts/make_brain_sample.py /tmp/nilearn/nilearn-0.14.1-py3-none-any.whl

The template's licence (a permissive notice, reproduced in ``Resources/SampleData/brain/README.md``) allows
redistribution with the copyright notice.
"""

from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

TEMPLATE = "nilearn/datasets/data/mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
BOX_MM = np.array([160.0, 192.0, 160.0])  # x, y, z: the LPBA40 field of view
SPACING_MM = 1.5
SEED = 2026


def _read_from_wheel(wheel: Path, part: str) -> sitk.Image:
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as folder:
        path = archive.extract(TEMPLATE.format(part), folder)
        return sitk.ReadImage(path, sitk.sitkFloat32)


def _reference_grid(template: sitk.Image) -> sitk.Image:
    """A 1.5 mm grid over a 160×192×160 mm box centred on the brain, in the template's orientation."""
    array = sitk.GetArrayFromImage(template)
    nonzero = np.argwhere(array > 0)
    low, high = nonzero.min(0)[::-1], nonzero.max(0)[::-1]  # x, y, z indices
    centre = template.TransformContinuousIndexToPhysicalPoint(((low + high) / 2.0).tolist())
    size = np.round(BOX_MM / SPACING_MM).astype(int)
    direction = np.array(template.GetDirection()).reshape(3, 3)
    origin = np.array(centre) - direction @ ((size - 1) / 2.0 * SPACING_MM)
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing([SPACING_MM] * 3)
    grid.SetDirection(template.GetDirection())
    grid.SetOrigin(origin.tolist())
    return grid


def _random_transform(grid: sitk.Image, rng: np.random.Generator) -> sitk.Transform:
    """Fixed → moving points: a smooth B-spline displacement, then a small affine about the box centre."""
    centre = grid.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in grid.GetSize()])
    angles = np.deg2rad(rng.uniform(-3, 3, 3))
    rotation = sitk.Euler3DTransform(centre, *angles.tolist())
    matrix = np.array(rotation.GetMatrix()).reshape(3, 3) @ (np.eye(3) + rng.uniform(-0.03, 0.03, (3, 3)))
    affine = sitk.AffineTransform(matrix.ravel().tolist(), (0.0, 0.0, 0.0), centre)
    bspline = sitk.BSplineTransformInitializer(grid, [4, 4, 4], order=3)
    coefficients = rng.normal(0.0, 2.5, len(bspline.GetParameters()))  # mm at the control points
    bspline.SetParameters(coefficients.tolist())
    return sitk.CompositeTransform([affine, bspline])  # applied last-added first: B-spline, then the affine


def _labels(grey: sitk.Image, white: sitk.Image) -> sitk.Image:
    g, w = sitk.GetArrayFromImage(grey) / 255.0, sitk.GetArrayFromImage(white) / 255.0
    labels = np.zeros(g.shape, np.uint8)
    labels[(g >= 0.5) & (g >= w)] = 1
    labels[(w >= 0.5) & (w > g)] = 2
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(grey)
    return image


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path, help="nilearn's wheel (pip download nilearn --no-deps)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
                        / "brain")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(SEED)
    template = _read_from_wheel(args.wheel, "t1")
    labels = _labels(_read_from_wheel(args.wheel, "gm"), _read_from_wheel(args.wheel, "wm"))
    grid = _reference_grid(template)
    identity = sitk.Transform(3, sitk.sitkIdentity)
    moving = sitk.Resample(template, grid, identity, sitk.sitkBSpline, 0.0)
    moving_labels = sitk.Resample(labels, grid, identity, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    truth = _random_transform(grid, rng)
    fixed = sitk.Resample(template, grid, truth, sitk.sitkBSpline, 0.0)
    # from the moving labels on the sample grid, so that the known transform maps one exactly onto the other
    fixed_labels = sitk.Resample(moving_labels, grid, truth, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)

    def to_uint8(image: sitk.Image, gamma: float, noise: float) -> sitk.Image:
        array = np.clip(sitk.GetArrayFromImage(image) / 255.0, 0.0, 1.0)
        inside = array > 0.02
        array = np.where(inside, array ** gamma + rng.normal(0.0, noise, array.shape), 0.0)
        result = sitk.GetImageFromArray(np.clip(np.round(array * 255.0), 0, 255).astype(np.uint8))
        result.CopyInformation(image)
        return result

    args.out.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(to_uint8(fixed, 0.85, 0.01), str(args.out / "icbm152_warped.nii.gz"), True)
    sitk.WriteImage(to_uint8(moving, 1.0, 0.0), str(args.out / "icbm152.nii.gz"), True)
    sitk.WriteImage(fixed_labels, str(args.out / "icbm152_warped_tissue.nii.gz"), True)
    sitk.WriteImage(moving_labels, str(args.out / "icbm152_tissue.nii.gz"), True)
    sitk.WriteTransform(truth, str(args.out / "ground_truth_transform.h5"))
    for path in sorted(args.out.iterdir()):
        print(f"{path.name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
