"""The metrics table node of a registration: three string columns (Metric, Value, Unit), one row per field of
:class:`~ICONRegistrationLib.pipeline.metrics.RegistrationMetrics` worth showing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import vtk

if TYPE_CHECKING:
    from ..pipeline.metrics import RegistrationMetrics


METRIC_ROWS = (  # (attribute path of RegistrationMetrics, label, unit)
    ("folds", "Folded voxels (det J ≤ 0)", "voxels"),
    ("folds_percent", "Folded voxels", "%"),
    ("jacobian_min", "Jacobian minimum", ""),
    ("jacobian_p1", "Jacobian 1st percentile", ""),
    ("jacobian_median", "Jacobian median", ""),
    ("jacobian_p99", "Jacobian 99th percentile", ""),
    ("jacobian_max", "Jacobian maximum", ""),
    ("ic_error_mean_mm", "IC error mean", "mm"),
    ("ic_error_p95_mm", "IC error 95th percentile", "mm"),
    ("ic_error_max_mm", "IC error maximum", "mm"),
    ("ic_error_overlap_mean_mm", "IC error mean where the field maps inside the moving image", "mm"),
    ("ic_outside_percent", "Field mapped outside the moving image (IC error there is extrapolated)", "%"),
    ("total_seconds", "Time", "s"),
    ("device", "Device", ""),
    ("model", "Model", ""),
    ("weights_sha256", "Weights sha256", ""),
    ("flips", "Prediction averaged over flips of network axes", ""),
    ("symmetric", "Directions made consistent (symmetric prediction)", ""),
    ("refinements", "Recursive refinements of the prediction", ""),
    ("io_iterations", "Instance-optimisation steps", ""),
    ("io_similarity_shape", "Instance-optimisation image grid", "voxels"),
    ("inverse.method", "Inverse transform", ""),
    ("inverse.max_error_mm", "Inverse round-trip error maximum", "mm"),
    ("inverse.forward_first_max_error_mm", "Inverse round-trip error maximum, forward transform first", "mm"),
    ("inverse.iterations", "Inverse fixed-point iterations", ""),
)


def _lookup(metrics: "RegistrationMetrics", path: str):
    """The value at an attribute path of the metrics (``"inverse.max_error_mm"``); a wrong path raises."""
    value: Any = metrics
    for part in path.split("."):
        value = getattr(value, part)
    return value


def format_metric(value) -> str:
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return " × ".join(format_metric(item) for item in value)
    return str(value)


def fill_metrics_table(table_node, metrics: "RegistrationMetrics") -> None:
    """Three string columns: Metric, Value, Unit (rows in :data:`METRIC_ROWS` order)."""
    table = table_node.GetTable()
    columns = []
    for name in ("Metric", "Value", "Unit"):
        column = vtk.vtkStringArray()
        column.SetName(name)
        columns.append(column)
    for key, label, unit in METRIC_ROWS:
        columns[0].InsertNextValue(label)
        columns[1].InsertNextValue(format_metric(_lookup(metrics, key)))
        columns[2].InsertNextValue(unit)
    for column in columns:
        table.AddColumn(column)
    table_node.SetUseColumnNameAsColumnHeader(True)
    table_node.SetLocked(True)
    table_node.Modified()


def metrics_rows(table_node) -> list[tuple[str, str, str]]:
    """``(label, value, unit)`` rows read back from a metrics table node, in table order."""
    table = table_node.GetTable()
    labels, values, units = (table.GetColumnByName(name) for name in ("Metric", "Value", "Unit"))
    return [(labels.GetValue(i), values.GetValue(i), units.GetValue(i)) for i in range(table.GetNumberOfRows())]


def metrics_from_table(table_node) -> dict[str, str]:
    """``{label: value}`` read back from a metrics table node."""
    return {label: value for label, value, _ in metrics_rows(table_node)}

