"""Weight averaging of snapshots along one training run (stochastic weight averaging, Izmailov et al., UAI 2018).

The mean of networks saved every few hundred steps late in a run, at a constant small learning rate, sits nearer
the centre of the flat region that the steps wander around than any single snapshot; for registration networks it
also smooths the predicted maps (lower inverse-consistency error). The snapshots must come from one run (or one
fine-tuning lineage): the mean of unrelated networks is meaningless.

Batch-norm running statistics are averaged like the weights. At the small learning rates this is meant for, the
snapshots' statistics differ by far less than a batch's, so the mean is a fair estimate for the mean network; the
averaged network must still pass validation before it replaces shipped weights, like any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..errors import UserError
from ..models.weights import read_state_dict, write_state_dict

#: ``iconreg train --keep-every N`` saves the network every N steps here (inside ``--out``), as
#: ``step_000300.pt`` = {"model": state dict, "step": 300}
SNAPSHOT_FOLDER = "snapshots"


def snapshot_path(out_dir: str | Path, step: int) -> Path:
    """Where the snapshot of ``step`` is kept in the training folder ``out_dir``."""
    return Path(out_dir) / SNAPSHOT_FOLDER / f"step_{step:06d}.pt"


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]], names: Sequence[str] = ()
                        ) -> dict[str, torch.Tensor]:
    """The element-wise mean of floating-point tensors of ``states`` (float32), accumulated in float64.

    All states must have the same keys and shapes (one architecture); integer buffers (batch-norm
    ``num_batches_tracked``) take the largest value. ``names`` label the states in error messages.
    """
    if len(states) < 2:
        raise UserError(f"Averaging needs at least two weight files, got {len(states)}.")
    names = list(names) or [f"#{i + 1}" for i in range(len(states))]
    first = states[0]
    for state, name in zip(states[1:], names[1:]):
        if set(state) != set(first):
            differing = sorted(set(state) ^ set(first))[:3]
            raise UserError(f"'{name}' and '{names[0]}' are not the same network (keys differ: "
                            f"{', '.join(differing)}); average snapshots of one training run only.")
        for key, tensor in first.items():
            if state[key].shape != tensor.shape:
                raise UserError(f"'{name}' and '{names[0]}' are not the same network ({key}: "
                                f"{tuple(state[key].shape)} ≠ {tuple(tensor.shape)}).")
    averaged = {}
    for key, tensor in first.items():
        if tensor.is_floating_point():
            total = torch.zeros(tensor.shape, dtype=torch.float64)
            for state in states:
                total += state[key].double()
            averaged[key] = (total / len(states)).float()
        else:
            averaged[key] = torch.stack([state[key] for state in states]).amax(dim=0)
    return averaged


def average_weights(sources: Sequence[str | Path], out: str | Path, half: bool = True) -> Path:
    """Write the mean of the weight files or checkpoints ``sources`` to ``out`` as a plain state dict (float16 by
    default, the shipped format, like :func:`~ICONRegistrationLib.training.trainer.export_weights`)."""
    if len(sources) < 2:
        raise UserError(f"Averaging needs at least two weight files, got {len(sources)}.")
    states = [read_state_dict(source) for source in sources]
    return write_state_dict(average_state_dicts(states, [str(source) for source in sources]), out, half)
