"""How the QA maps look in Slicer: colour tables, fixed windows, thresholds and slice-view layers.

Slice views blend an overlay layer with one opacity (colour-table alpha is not used for scalar volumes), so:

Fold map (Jacobian determinant, unitless), window [−1, 3], shown at 45 % opacity over the fixed image:
    det ≤ 0 (folding) saturated red; 0 < det < 1 (compression) dark to light blue; det = 1 neutral grey (the
    image shows through almost unchanged); 1 < det < 3 (expansion) grey to orange; ≥ 3 saturates.
Inverse-consistency error (mm), window [0, 1] mm, shown at 80 % opacity:
    errors below 0.1 mm are transparent (the volume's display threshold); above, a heat scale from dark red
    through red and yellow to white at ≥ 1 mm (about a voxel).
The windows are fixed (not automatic) so maps of different registrations compare by eye.
"""

from __future__ import annotations

import numpy as np
import slicer

JACOBIAN_WINDOW = (-1.0, 3.0)
IC_ERROR_WINDOW_MM = (0.0, 1.0)
FOLD_TABLE_NAME = "ICONRegistration fold map"
IC_TABLE_NAME = "ICONRegistration IC error"
_TABLE_SIZE = 256
OVERLAY_LAYER = 3  # the first additional slice layer (0, 1, 2 are background, foreground and label)
FOLD_OVERLAY_OPACITY = 0.45
IC_OVERLAY_OPACITY = 0.8
IC_VISIBLE_FROM_MM = 0.1


def _fold_colour(value: float) -> tuple[float, float, float, float]:
    grey = (0.5, 0.5, 0.5)
    if value <= 0.0:
        return 1.0, 0.0, 0.0, 1.0
    if value < 1.0:  # dark blue (strong compression) → grey
        low = (0.05, 0.15, 0.85)
        return (*(l + (g - l) * value for l, g in zip(low, grey)), 1.0)
    t = min((value - 1.0) / 2.0, 1.0)  # grey → orange (strong expansion)
    high = (1.0, 0.55, 0.0)
    return (*(g + (h - g) * t for g, h in zip(grey, high)), 1.0)


def _heat_colour(value_mm: float) -> tuple[float, float, float, float]:
    t = min(max(value_mm / IC_ERROR_WINDOW_MM[1], 0.0), 1.0)
    red = min(1.0, 0.35 + 2.0 * t)
    green = min(1.0, max(0.0, 2.0 * t - 0.4))
    blue = min(1.0, max(0.0, 3.0 * t - 2.0))
    return red, green, blue, 1.0


def _colour_table(scene, name: str, low: float, high: float, colour) -> "slicer.vtkMRMLColorTableNode":
    """The scene's colour table ``name`` (created once per scene) sampling ``colour`` over [low, high]."""
    existing = scene.GetFirstNodeByName(name)
    if existing is not None and existing.IsA("vtkMRMLColorTableNode"):
        return existing
    table = slicer.vtkMRMLColorTableNode()
    table.SetName(name)
    table.SetTypeToUser()
    table.SetHideFromEditors(False)
    table.SetNumberOfColors(_TABLE_SIZE)
    for index, value in enumerate(np.linspace(low, high, _TABLE_SIZE)):
        table.SetColor(index, f"{value:.3g}", *colour(float(value)))
    table.SetAttribute("Category", "ICONRegistration")
    scene.AddNode(table)
    return table


def fold_colour_table(scene):
    """Colour table of the Jacobian fold map (see the module docstring)."""
    return _colour_table(scene, FOLD_TABLE_NAME, *JACOBIAN_WINDOW, _fold_colour)


def ic_error_colour_table(scene):
    """Heat colour table of the inverse-consistency error map in mm (see the module docstring)."""
    return _colour_table(scene, IC_TABLE_NAME, *IC_ERROR_WINDOW_MM, _heat_colour)


def overlay_legend(overlay: str, stops: int = 41) -> dict:
    """How an overlay's colours read, for a legend beside the views: the value range, its unit, a CSS
    ``linear-gradient`` sampled from the same colour function as the colour table, and labelled ticks.

    ``overlay`` is ``"folds"`` (Jacobian determinant, unitless) or ``"ic"`` (inverse-consistency error, mm).
    """
    if overlay == "folds":
        low, high = JACOBIAN_WINDOW
        colour, title, unit = _fold_colour, "Jacobian determinant (≤ 0: folding)", ""
        ticks = [(-1.0, "≤ 0 fold"), (1.0, "1"), (3.0, "≥ 3")]
    elif overlay == "ic":
        low, high = IC_ERROR_WINDOW_MM
        colour, title, unit = _heat_colour, f"Inverse-consistency error (mm; < {IC_VISIBLE_FROM_MM:g} mm hidden)", "mm"
        ticks = [(0.0, "0 mm"), (0.5, "0.5 mm"), (1.0, "≥ 1 mm")]
    else:
        raise ValueError(f"No legend for overlay {overlay!r}.")
    parts = []
    for value in np.linspace(low, high, stops):
        red, green, blue, _ = colour(float(value))
        parts.append(f"rgb({round(red * 255)},{round(green * 255)},{round(blue * 255)}) "
                     f"{100 * (value - low) / (high - low):.1f}%")
    return {"title": title, "unit": unit, "low": low, "high": high,
            "gradient": f"linear-gradient(to right, {', '.join(parts)})",
            "ticks": [{"label": label, "percent": 100 * (value - low) / (high - low)} for value, label in ticks]}


def show_with_fixed_window(volume_node, colour_table, window: tuple[float, float],
                           visible_from: "float | None" = None) -> None:
    """Give ``volume_node`` a display node using ``colour_table`` over the fixed value range ``window``;
    values below ``visible_from`` are transparent in slice views (display threshold)."""
    if volume_node.GetDisplayNode() is None:
        volume_node.CreateDefaultDisplayNodes()
    display = volume_node.GetDisplayNode()
    display.SetAndObserveColorNodeID(colour_table.GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(*window)
    display.SetInterpolate(False)  # voxels as they are: a fold is a voxel property
    if visible_from is not None:
        display.AutoThresholdOff()
        display.SetThreshold(visible_from, 1e30)
        display.ApplyThresholdOn()


def set_slice_layers(scene, background=None, foreground=None, foreground_opacity: float = 0.5,
                     overlay=None, overlay_opacity: float = 1.0, clear: bool = False) -> int:
    """Show volumes in every slice view of the scene; returns how many views were set (0 without a layout).

    ``overlay`` goes to the first additional layer, above the foreground, so the fixed image, the warped moving
    image and a QA map can be seen together; ``overlay=None`` clears that layer. ``clear`` empties the
    background and foreground layers too (before the volumes shown are removed from the scene).
    """
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    count = composites.GetNumberOfItems()
    for index in range(count):
        composite = composites.GetItemAsObject(index)
        with slicer.util.NodeModify(composite):
            if clear:
                composite.SetBackgroundVolumeID(None)
                composite.SetForegroundVolumeID(None)
            if background is not None:
                composite.SetBackgroundVolumeID(background.GetID())
            if foreground is not None:
                composite.SetForegroundVolumeID(foreground.GetID())
                composite.SetForegroundOpacity(foreground_opacity)
            composite.SetNthLayerVolumeID(OVERLAY_LAYER, overlay.GetID() if overlay is not None else None)
            composite.SetNthLayerOpacity(OVERLAY_LAYER, overlay_opacity)
    return count
