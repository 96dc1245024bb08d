"""Render the README / extension screenshot offscreen with Slicer's own slice logic (slicer-core, no GUI).

Registers the bundled sample pair with its model through ICONRegistrationLogic, then lets Slicer's
``vtkMRMLSliceLogic`` reslice and blend the layers of three slice views exactly as the module sets them up
(fixed + warped moving at 50 %, fixed + fold map, fixed + inverse-consistency heatmap, each with its colour
table and fixed window), and writes them side by side as one PNG.

    python scripts/render_screenshot.py --out Resources/Screenshots/ICONRegistration-sample.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ICONRegistration"))


def slice_image(scene, app_logic, name: str, orientation: str, background, foreground=None, overlay=None,
                overlay_opacity: float = 1.0, size: int = 420) -> np.ndarray:
    """The RGB image Slicer's slice logic composes for one slice view (background, foreground at 50 %, overlay)."""
    import slicer
    from vtk.util import numpy_support

    from ICONRegistrationLib.mrml.display import OVERLAY_LAYER

    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(app_logic)
    logic.SetMRMLScene(scene)
    slice_node = logic.AddSliceNode(name)
    app_logic.GetSliceLogics().AddItem(logic)
    composite = logic.GetSliceCompositeNode()
    composite.SetBackgroundVolumeID(background.GetID())
    composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
    composite.SetForegroundOpacity(0.5)
    composite.SetNthLayerVolumeID(OVERLAY_LAYER, overlay.GetID() if overlay is not None else None)
    composite.SetNthLayerOpacity(OVERLAY_LAYER, overlay_opacity)
    slice_node.SetOrientation(orientation)
    slice_node.SetDimensions(size, size, 1)
    logic.FitSliceToAll()
    producer = logic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return pixels[::-1, :, :3].copy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "Resources" / "Screenshots" / "ICONRegistration-sample.png"))
    parser.add_argument("--orientation", default="Coronal", choices=["Axial", "Coronal", "Sagittal"])
    parser.add_argument("--model", help="model (default: the one named in the sample data's sample.json)")
    args = parser.parse_args(argv)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk
    import slicer
    import vtk

    from ICONRegistrationLib.demo import sample_pair
    from ICONRegistrationLib.mrml import display
    from ICONRegistrationLib.mrml.logic import ICONRegistrationLogic
    from ICONRegistrationLib.mrml.nodes import update_volume_from_image

    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    app_logic.GetColorLogic().SetMRMLScene(scene)
    app_logic.GetColorLogic().AddDefaultColorNodes()
    app_logic.SetSliceLogics(vtk.vtkCollection())
    sample = sample_pair()
    nodes = {}
    for role in ("fixed", "moving"):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", role)
        update_volume_from_image(node, sitk.ReadImage(str(sample[role])))
        node.CreateDefaultDisplayNodes()
        nodes[role] = node
    logic = ICONRegistrationLogic(scene)
    outputs = logic.register(nodes["fixed"], nodes["moving"], args.model or sample["model"], fixedModality=sample["modality"],
                             movingModality=sample["modality"], outputMode="warped")
    metrics = outputs.result.metrics
    panels = [
        ("fixed + warped moving (50 %)",
         slice_image(scene, app_logic, "Red", args.orientation, nodes["fixed"], outputs.output_volume)),
        ("fold map: det J ≤ 0 red, <1 blue, >1 orange",
         slice_image(scene, app_logic, "Yellow", args.orientation, nodes["fixed"], overlay=outputs.jacobian,
                     overlay_opacity=display.FOLD_OVERLAY_OPACITY)),
        ("inverse-consistency error > 0.1 mm, 0–1 mm scale",
         slice_image(scene, app_logic, "Green", args.orientation, nodes["fixed"], overlay=outputs.ic_error,
                     overlay_opacity=display.IC_OVERLAY_OPACITY)),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(12.6, 4.6), facecolor="black")
    for ax, (title, pixels) in zip(axes, panels):
        ax.imshow(pixels)
        ax.set_title(title, color="white", fontsize=11)
        ax.axis("off")
    figure.suptitle(f"ICON Registration, model {metrics['model']}: {metrics['folds']} folded voxels, "
                    f"IC error {metrics['ic_error_mean_mm']:.3f} mm mean ({args.orientation.lower()} slice, "
                    "Slicer slice logic, offscreen)", color="white", fontsize=11)
    figure.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100, facecolor="black")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
