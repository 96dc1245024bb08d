"""Package-level contracts: import hygiene, out-of-memory as a user error, inputs never modified."""

from __future__ import annotations

import json
from pathlib import Path

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import REPO, blob_volume, make_image, rotation, tiny_spec
from ICONRegistrationLib import UserError, register
from ICONRegistrationLib.models import LoadedModel


def test_engine_imports_only_torch_numpy_simpleitk():
    code = ("import sys; import ICONRegistrationLib, ICONRegistrationLib.cli, ICONRegistrationLib.io; "
            "bad = {'matplotlib', 'scipy', 'slicer', 'vtk', 'qt', 'ctk', 'icon_registration', 'itk', 'torchvision',"
            " 'nibabel', 'monai'}; print(sorted(m for m in sys.modules if m.split('.')[0] in bad))")
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=REPO / "ICONRegistration").stdout.strip()
    assert output == "[]"


class _OutOfMemoryNetwork(torch.nn.Module):
    def forward(self, image_A, image_B):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_out_of_memory_becomes_a_user_error_with_advice():
    fixed = make_image(blob_volume((20, 22, 24)))
    model = LoadedModel(tiny_spec(), _OutOfMemoryNetwork(), torch.device("cpu"), None, None)
    with pytest.raises(UserError, match="Out of memory.*cpu"):
        register(fixed, fixed, model, fixed_modality="mri", moving_modality="mri")


def test_out_of_memory_after_the_network_becomes_a_user_error_naming_the_stage(monkeypatch):
    from ICONRegistrationLib.pipeline import registration as module

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(module, "_warp_moving", out_of_memory)
    fixed = make_image(blob_volume((20, 22, 24)))
    with pytest.raises(UserError, match="Out of memory on cpu in the export stage"):
        register(fixed, fixed, tiny_spec(), fixed_modality="mri", moving_modality="mri", random_weights=True)


def test_inputs_are_not_modified():
    fixed = make_image(blob_volume((30, 32, 28), seed=1), spacing=(1.2, 0.8, 1.5), origin=(1.0, 2.0, 3.0),
                       direction=rotation(2, 15))
    moving = make_image(blob_volume((28, 30, 33), seed=2), spacing=(1.0, 1.1, 1.3))
    mask = make_image((blob_volume((30, 32, 28), seed=1) > 50).astype(np.uint8), spacing=(1.2, 0.8, 1.5),
                      origin=(1.0, 2.0, 3.0), direction=rotation(2, 15))
    snapshots = [(sitk.GetArrayFromImage(i).copy(), i.GetOrigin(), i.GetSpacing(), i.GetDirection())
                 for i in (fixed, moving, mask)]
    register(fixed, moving, tiny_spec(), fixed_modality="mri", moving_modality="auto", fixed_mask=mask,
             random_weights=True)
    for image, (array, origin, spacing, direction) in zip((fixed, moving, mask), snapshots):
        assert np.array_equal(sitk.GetArrayFromImage(image), array)
        assert (image.GetOrigin(), image.GetSpacing(), image.GetDirection()) == (origin, spacing, direction)


def test_a_mask_on_the_network_grid_covers_the_voxels_whose_centres_it_covers():
    """A mask over the first 17 of 34 columns is half the box: on a 36-column grid, 18 columns. Trilinear resampling
    gave the 19th column (0.500–0.528 of the box) a weight of 0.03, and every non-zero voxel counted as inside."""
    from ICONRegistrationLib.pipeline.grid import Grid
    from ICONRegistrationLib.pipeline.registration import _mask_on_grid

    image = make_image(np.zeros((20, 22, 34), np.float32))
    mask = np.zeros((20, 22, 34), np.float32)
    mask[:, :, :17] = 1
    on_grid = _mask_on_grid(mask, Grid.over_image(image, (20, 22, 36)), "cpu", "moving")
    assert on_grid.shape[-1] == 36 and sorted(set(on_grid.unique().tolist())) == [0.0, 1.0]
    assert int(on_grid[0, 0, 10, 10].sum()) == 18
    tiny = np.zeros_like(mask)
    tiny[10, 10, 3] = 1  # a single voxel: under half of every coarse voxel
    with pytest.raises(UserError, match="moving mask covers no voxel of the 5×5×5 grid"):
        _mask_on_grid(tiny, Grid.over_image(image, (5, 5, 5)), "cpu", "moving")


def test_instance_optimisation_across_modalities_with_a_same_modality_similarity_warns():
    """A CT/MRI pair optimised with the model's LNCC (signed: it rewards intensities that rise together) used to run
    without a word; a cross-modal similarity, or one modality, runs without a warning."""
    import warnings

    fixed = make_image(blob_volume((20, 22, 24), seed=1))
    fixed_ct = make_image(blob_volume((20, 22, 24), seed=1) - 1000)  # in HU: air at −1000
    moving = make_image(blob_volume((20, 22, 24), seed=2))
    common = dict(random_weights=True, io_iterations=1)
    with pytest.warns(UserWarning, match="compares a CT image with a MRI image by lncc"):
        register(fixed_ct, moving, tiny_spec(), fixed_modality="ct", moving_modality="mri", **common)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        register(fixed_ct, moving, tiny_spec(), fixed_modality="ct", moving_modality="mri",
                 io_similarity="squared_lncc", **common)
        register(fixed, moving, tiny_spec(), fixed_modality="mri", moving_modality="mri", **common)


def test_lung_model_requires_a_mask():
    spec = tiny_spec(preprocessing={"ct_window": [-1000, 0], "require_mask": True})
    ct = make_image(blob_volume((20, 22, 24)) - 1000)
    with pytest.raises(UserError, match="needs a mask"):
        register(ct, ct, spec, fixed_modality="ct", moving_modality="ct", random_weights=True)


def test_no_array_view_of_a_temporary_simpleitk_image():
    """``sitk.GetArrayViewFromImage(f(...))`` reads freed memory once the temporary image is collected (it made
    ``invert_field`` count 4 phantom folds of a fold-free field). Views must be taken of images held by a name."""
    import ast

    offenders = []
    for path in sorted((REPO / "ICONRegistration").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
                    == "GetArrayViewFromImage" and node.args and isinstance(node.args[0], ast.Call)):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_no_module_reads_registration_metrics_by_string_key():
    """Registration metrics are a typed dataclass read through attributes: ``metrics["…"]`` or ``metrics.get("…")``
    in the package (outside the metrics type itself) would turn a renamed field into a silent "—"."""
    import ast

    offenders = []
    for path in sorted((REPO / "ICONRegistration").rglob("*.py")):
        if path.name == "metrics.py" and path.parent.name == "pipeline":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            target = None
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                    and isinstance(node.slice.value, str):
                target = node.value
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get":
                target = node.func.value
            name = getattr(target, "attr", getattr(target, "id", None))
            if name == "metrics":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []


def test_metrics_table_rows_name_real_fields_and_json_round_trips(tmp_path):
    from ICONRegistrationLib.pipeline.metrics import RegistrationMetrics

    fixed = make_image(blob_volume((20, 22, 24)))
    moving = make_image(blob_volume((20, 22, 24), centre=(11, 11, 12), seed=1))
    result = register(fixed, moving, tiny_spec(), fixed_modality="mri", moving_modality="mri", random_weights=True,
                      exact_inverse=True)
    metrics = result.metrics
    assert RegistrationMetrics.from_dict(json.loads(json.dumps(metrics.to_dict()))) == metrics
    try:
        from ICONRegistrationLib.mrml.logic import METRIC_ROWS, _lookup
    except ImportError:  # slicer-core absent: the rows are checked where the MRML layer runs
        return
    for path, _, _ in METRIC_ROWS:
        _lookup(metrics, path)  # raises AttributeError for a renamed field
    with pytest.raises(AttributeError):
        _lookup(metrics, "ic_error_average_mm")


def test_package_boundaries():
    """Imports point down the layers: evaluation and training do not import each other (datasets and overlap are
    neutral modules), io does not import the pipeline at run time (only for type checking), core, models and
    pipeline never import slicer, vtk or qt, the MRML layer never qt, and no layer imports a front end (the web
    app, trame, the CLI)."""
    import ast

    def runtime_imports(path: Path) -> list[tuple[int, str]]:
        tree = ast.parse(path.read_text(), str(path))
        skipped = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(child) for child in ast.walk(node))
        found = []
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.ImportFrom):
                found.append((node.lineno, ("." * node.level) + (node.module or "")))
            elif isinstance(node, ast.Import):
                found.extend((node.lineno, alias.name) for alias in node.names)
        return found

    library = REPO / "ICONRegistration" / "ICONRegistrationLib"
    front = ("webapp", "trame", "trame_slicer", "cli")  # nothing below the front ends imports them
    rules = {"evaluation": ("training",) + front, "training": ("evaluation",) + front, "io": ("pipeline",) + front,
             "core": ("slicer", "vtk", "qt", "mrml") + front, "models": ("slicer", "vtk", "qt", "mrml") + front,
             "pipeline": ("slicer", "vtk", "qt", "mrml") + front, "mrml": ("qt", "ctk") + front,
             "webapp": ("qt", "ctk", "cli")}
    offenders = []
    for package, banned in rules.items():
        for path in sorted((library / package).glob("*.py")):
            for line, module in runtime_imports(path):
                if set(module.strip(".").split(".")) & set(banned):
                    offenders.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert offenders == []


def test_warnings_given_before_an_error_still_reach_the_caller():
    """register keeps its warnings with the result; when it fails, they are passed on all the same."""
    fixed = make_image(blob_volume((20, 22, 24)))
    model = LoadedModel(tiny_spec(), _OutOfMemoryNetwork(), torch.device("cpu"), None, None)
    with pytest.warns(UserWarning, match="given as CT but has no voxel below 0 HU"):
        with pytest.raises(UserError, match="Out of memory"):
            register(fixed, fixed, model, fixed_modality="ct", moving_modality="ct")


def test_inverse_of_a_fold_free_registration_reports_no_folds():
    """The forward field of a registration without folds is invertible: no phantom folds, converged."""
    from ICONRegistrationLib.pipeline.inverse import invert_field
    from ICONRegistrationLib.pipeline.qa import field_jacobian

    fixed = make_image(blob_volume((30, 34, 32), seed=1), spacing=(1.2, 1.0, 1.1))
    moving = make_image(blob_volume((30, 34, 32), seed=2), spacing=(1.2, 1.0, 1.1))
    from analytic import analytic_model

    model = analytic_model(fixed, moving, rotation(2, 5.0), np.array([1.0, -1.0, 0.5]), bulge=1.0)
    result = register(fixed, moving, model, fixed_modality="mri", moving_modality="mri")
    assert result.metrics.folds == 0
    assert int((sitk.GetArrayFromImage(field_jacobian(result.forward_field)) <= 0).sum()) == 0
    for _ in range(3):  # repeated, so freed memory would be reused and show up
        inverse = invert_field(result.forward_field, moving)
        assert inverse.report.folds == 0 and inverse.report.invertible


def test_front_ends_collect_the_engines_user_warnings_once_each_in_order():
    """The Slicer module and the web page show what ``register`` warned about (collect_user_warnings); other
    warning categories are only logged, and errors propagate."""
    import warnings

    from ICONRegistrationLib.errors import UserError, collect_user_warnings

    def engine():
        warnings.warn("fields of view differ", UserWarning)
        warnings.warn("internal detail", DeprecationWarning)
        warnings.warn("given as CT but no voxel below 0 HU", UserWarning)
        warnings.warn("fields of view differ", UserWarning)
        return 42

    result, said = collect_user_warnings(engine)
    assert result == 42 and said == ["fields of view differ", "given as CT but no voxel below 0 HU"]

    def failing():
        warnings.warn("about to fail", UserWarning)
        raise UserError("bad input")

    with pytest.raises(UserError, match="bad input"):
        collect_user_warnings(failing)
