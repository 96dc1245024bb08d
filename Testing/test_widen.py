"""Widening a trained GradICON network (``iconreg convert-weights --to WIDER.json``): the wider network starts from
the trained one's function, and every added channel can learn."""

from __future__ import annotations

import json

import pytest
import torch

from ICONRegistrationLib.core.networks import UNet2
from ICONRegistrationLib.errors import UserError
from ICONRegistrationLib.models.convert import widen_unet

SMALL = [[2, 8, 16, 16, 32], [8, 16, 16, 32]]
# uneven growth: every down level adds more channels than its input, one level keeps its width
WIDE = [[2, 12, 24, 28, 48], [12, 20, 24, 48]]
SHAPE = (1, 1, 20, 24, 18)


def _trained_like(channels) -> UNet2:
    """A UNet with random weights everywhere (the last convolution too) and batch-norm statistics that are not
    the defaults, as after training."""
    torch.manual_seed(0)
    net = UNet2(4, channels)
    with torch.no_grad():
        net.lastConv.weight.normal_(0, 0.05)
        net.lastConv.bias.normal_(0, 0.05)
        net.train()
        for _ in range(3):
            net(torch.rand(SHAPE), torch.rand(SHAPE))
        for norm in net.batchNorms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_(0, 0.1)
    return net


def _pair():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(SHAPE, generator=generator), torch.rand(SHAPE, generator=generator)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_widening_without_noise_computes_the_same_displacement(mode):
    """The residual paths pad at the front and crop at the back; the source's channels must sit where the wider
    network pairs the same channels, or the output changes by whole voxels (what a prefix layout gave)."""
    small, wide = _trained_like(SMALL), UNet2(4, WIDE)
    widen_unet(small, wide, noise=0.0)
    small.train(mode == "train")
    wide.train(mode == "train")
    image_A, image_B = _pair()
    with torch.no_grad():
        expected, actual = small(image_A, image_B), wide(image_A, image_B)
    assert float(expected.abs().mean()) > 1e-3  # a displacement to compare
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


def test_widening_noise_moves_the_output_little_and_every_added_weight_learns():
    small, wide = _trained_like(SMALL), UNet2(4, WIDE)
    widen_unet(small, wide, noise=1e-2, generator=torch.Generator().manual_seed(0))
    small.eval()
    wide.eval()
    image_A, image_B = _pair()
    with torch.no_grad():
        expected, actual = small(image_A, image_B), wide(image_A, image_B)
    change = float((actual - expected).abs().mean() / expected.abs().mean())
    assert 0 < change < 0.05
    wide.train()
    wide(image_A, image_B).square().sum().backward()
    for name, parameter in wide.named_parameters():
        if parameter.dim() > 1:
            assert bool((parameter != 0).all()), name
            assert float(parameter.grad.abs().max()) > 0, name


def test_widening_refuses_a_narrower_or_deeper_target():
    small = _trained_like(SMALL)
    with pytest.raises(UserError, match="at least as wide"):
        widen_unet(small, UNet2(4, [[2, 8, 16, 16, 24], [8, 16, 16, 32]]))
    with pytest.raises(UserError, match="depth"):
        widen_unet(small, UNet2(5, [[2, 8, 16, 16, 32, 32], [8, 16, 16, 32, 32]]))
    with pytest.raises(UserError, match="residual"):  # the second level would add fewer channels than its input
        widen_unet(small, UNet2(4, [[2, 16, 18, 18, 40], [8, 16, 16, 32]]))
    with pytest.raises(UserError, match="below it less"):  # the deepest level would crop source channels away
        widen_unet(small, UNet2(4, [[2, 12, 24, 28, 48], [12, 20, 24, 40]]))


def test_cli_widens_a_gradicon_model_that_the_wider_spec_loads(tmp_path, capsys):
    from ICONRegistrationLib.cli import main
    from ICONRegistrationLib.models import load_model
    from ICONRegistrationLib.models.build import build_network
    from ICONRegistrationLib.models.spec import ModelSpec
    from ICONRegistrationLib.models.weights import write_state_dict

    def spec(name, channels):
        return {"name": name, "architecture": "gradicon", "unet": {"num_layers": 4, "channels": channels},
                "levels": 2, "last_step": True, "input_shape": [20, 24, 18],
                "similarity": {"name": "lncc", "sigma": 2}, "lambda": 1.5, "preprocessing": {"mri_percentile": 99},
                "weights": {"file": f"{name}.pt", "sha256": None}}

    torch.manual_seed(0)
    source = build_network(ModelSpec.from_dict(spec("g", SMALL)))
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.normal_(0, 0.05)
    write_state_dict(source.state_dict(), tmp_path / "g.pt", half=False)
    (tmp_path / "g.json").write_text(json.dumps(spec("g", SMALL)))
    (tmp_path / "w.json").write_text(json.dumps(spec("w", WIDE)))
    assert main(["convert-weights", "--from", str(tmp_path / "g.json"), "--weights", str(tmp_path / "g.pt"),
                 "--to", str(tmp_path / "w.json"), "--out", str(tmp_path / "w.pt"), "--noise", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["to"] == "w"
    small = load_model(tmp_path / "g.json", tmp_path / "g.pt", device="cpu")
    wide = load_model(tmp_path / "w.json", tmp_path / "w.pt", device="cpu")  # strict loading
    image_A, image_B = torch.rand(1, 1, 20, 24, 18), torch.rand(1, 1, 20, 24, 18)
    from ICONRegistrationLib.core.coordinates import identity_map

    grid = identity_map((20, 24, 18))
    with torch.no_grad():
        expected = small.net(image_A, image_B)(grid) - grid
        actual = wide.net(image_A, image_B)(grid) - grid
    assert float(expected.abs().mean()) > 1e-4
    # float16 weights on both sides; the same function to float16 rounding
    torch.testing.assert_close(actual, expected, rtol=1e-2, atol=1e-4)


def test_loading_narrower_weights_into_a_wider_spec_names_the_widening_command():
    from ICONRegistrationLib.models.weights import load_state_dict_strict

    narrow, wide = _trained_like(SMALL), UNet2(4, WIDE)
    with pytest.raises(UserError, match="convert-weights") as error:
        load_state_dict_strict(wide, narrow.state_dict(), source="initial weights")
    assert "wrong shape" in str(error.value)
    with pytest.raises(UserError) as error:  # wider weights into a narrower network: no such hint
        load_state_dict_strict(narrow, wide.state_dict(), source="initial weights")
    assert "convert-weights" not in str(error.value)
