"""Package-level contracts: import hygiene, out-of-memory as a user error, inputs never modified."""

from __future__ import annotations

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


def test_lung_model_requires_a_mask():
    spec = tiny_spec(preprocessing={"ct_window": [-1000, 0], "require_mask": True})
    ct = make_image(blob_volume((20, 22, 24)) - 1000)
    with pytest.raises(UserError, match="needs a mask"):
        register(ct, ct, spec, fixed_modality="ct", moving_modality="ct", random_weights=True)
