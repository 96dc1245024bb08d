"""The web app's slice views rendered offscreen without a browser or a server: pictures of a registration.

The same trame-slicer slice views (axial, coronal, sagittal Slicer slice views, EGL offscreen) and the same
:class:`~.session.RegistrationSession` as ``iconreg app``, so a picture shows exactly what the page shows. Used for
the README / extension screenshot::

    python -m ICONRegistrationLib.webapp.render --out Resources/Screenshots/ICONRegistration-sample.png
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # no X server: render with EGL

OVERLAY_TITLES = {"none": "fixed + warped moving", "folds": "fold map (det J ≤ 0 red, < 1 blue, > 1 orange)",
                  "ic": "inverse-consistency error (0–1 mm, < 0.1 mm hidden)"}


class OffscreenSliceViews:
    """A Slicer scene with three offscreen slice views (axial, coronal, sagittal) of ``size`` pixels."""

    def __init__(self, size: tuple[int, int] = (360, 360)):
        from trame_slicer.core import SlicerApp
        from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

        self.app = SlicerApp()
        self.app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
        self.views = [self.app.view_manager.create_view(definition) for definition in (
            ViewLayoutDefinition.axial_view(), ViewLayoutDefinition.coronal_view(),
            ViewLayoutDefinition.sagittal_view())]
        for view in self.views:
            view.render_window().SetSize(*size)

    @property
    def scene(self):
        return self.app.scene

    def capture(self, fit: bool = True) -> list[np.ndarray]:
        """Each view as an RGB uint8 array ``[height, width, 3]`` (top row first)."""
        from vtkmodules.util.numpy_support import vtk_to_numpy
        from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

        pictures = []
        for view in self.views:
            if fit:
                view.fit_view_to_content()
            view.render()
            grab = vtkWindowToImageFilter()
            grab.SetInput(view.render_window())
            grab.ReadFrontBufferOff()
            grab.Update()
            image = grab.GetOutput()
            width, height, _ = image.GetDimensions()
            pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
            pictures.append(pixels[::-1, :, :3].copy())
        return pictures


def render_registration(out: str | Path, fixed, moving, settings, *, fixed_name: str = "fixed",
                        moving_name: str = "moving", overlays: tuple[str, ...] = ("none", "folds", "ic"),
                        size: int = 320) -> dict:
    """Register ``moving`` to ``fixed`` (SimpleITK images) with ``settings`` as the app does and write one PNG:
    a row of the three slice views per overlay, with titles. Returns the pictures by overlay and the metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_path
    from ..mrml.display import set_slice_layers
    from .session import RegistrationSession

    views = OffscreenSliceViews((size, size))
    with tempfile.TemporaryDirectory(prefix="iconreg-render-") as work:
        session = RegistrationSession(views.scene, work)
        session.set_inputs(fixed, moving, fixed_name, moving_name)
        outputs = session.register(settings)
        pictures = {}
        for overlay in overlays:
            session.set_overlay(overlay)
            pictures[overlay] = views.capture()
        metrics = outputs.result.metrics
        set_slice_layers(views.scene, clear=True)  # the views let go of the nodes before they are destroyed
    figure, axes = plt.subplots(len(overlays), 3, figsize=(3 * size / 100, len(overlays) * size / 100 + 0.6),
                                squeeze=False, facecolor="black")
    for row, overlay in enumerate(overlays):
        for column, (picture, name) in enumerate(zip(pictures[overlay], ("axial", "coronal", "sagittal"))):
            axis = axes[row][column]
            axis.imshow(picture)
            axis.set_axis_off()
            if column == 1:
                axis.set_title(OVERLAY_TITLES[overlay], color="white", fontsize=9)
    figure.suptitle(f"{metrics.model}: {metrics.folds} folded voxels, IC error {metrics.ic_error_mean_mm:.3f} mm "
                    "mean (Slicer slice views, offscreen)", color="white", fontsize=10)
    figure.tight_layout()
    out = Path(out)
    with atomic_path(out) as temporary:
        figure.savefig(str(temporary), format="png", dpi=100, facecolor="black")
    plt.close(figure)
    return {"pictures": pictures, "metrics": metrics, "path": out}


def main(argv: Optional[list[str]] = None) -> None:
    from ..demo import sample_pair
    from ..io.images import read_image
    from ..mrml.logic import RegistrationSettings

    parser = argparse.ArgumentParser(description="Render the sample pair's registration in Slicer slice views, "
                                                 "offscreen (the README / extension screenshot).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--size", type=int, default=320, help="pixels per view")
    args = parser.parse_args(argv)
    sample = sample_pair()
    modality = sample.get("modality", "auto")
    render_registration(args.out, read_image(sample["fixed"], "fixed"), read_image(sample["moving"], "moving"),
                        RegistrationSettings(model=sample["model"], fixedModality=modality, movingModality=modality),
                        fixed_name=Path(sample["fixed"]).name, moving_name=Path(sample["moving"]).name,
                        size=args.size)
    print(args.out)


if __name__ == "__main__":
    main()
