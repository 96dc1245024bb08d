"""Instance optimisation: fine-tune the network on one pair, then give the cached model its weights back."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..core.objective import symmetric_objective
from ..progress import ProgressCallback, report


def optimize_instance(net: torch.nn.Module, image_A: torch.Tensor, image_B: torch.Tensor, *, iterations: int,
                      similarity: Callable, lmbda: float, penalty: str = "gradicon", learning_rate: float = 2e-5,
                      mask_A: Optional[torch.Tensor] = None, mask_B: Optional[torch.Tensor] = None,
                      progress: Optional[ProgressCallback] = None) -> tuple[Callable, list[float]]:
    """Run ``iterations`` Adam steps of the training objective (``penalty``: the model's regulariser, GradICON by
    default) on the pair, return the optimised transform.

    The returned transform is ``[Φ_AB; Φ_BA]`` for the batch ``[A; B]`` vs ``[B; A]`` (see
    :func:`~ICONRegistrationLib.core.objective.symmetric_objective`), evaluated after the last step; it
    captures the predicted fields, not the weights. ``net``'s weights and mode are restored before returning,
    also on error or cancellation. Returns the transform and the objective before each step and after the last
    one (``iterations + 1`` values).
    """
    saved = {key: value.detach().clone() for key, value in net.state_dict().items()}
    was_training = net.training
    history: list[float] = []
    net.eval()  # batch-norm statistics stay those of the trained model, as in uniGradICON
    try:
        optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
        for step in range(iterations):
            optimizer.zero_grad(set_to_none=True)
            terms = symmetric_objective(net, image_A, image_B, similarity=similarity, lmbda=lmbda,
                                        penalty=penalty, mask_A=mask_A, mask_B=mask_B)
            terms.loss.backward()
            optimizer.step()
            history.append(float(terms.loss.detach()))
            report(progress, "instance optimisation", (step + 1) / iterations)
        with torch.no_grad():
            final = symmetric_objective(net, image_A, image_B, similarity=similarity, lmbda=lmbda,
                                        penalty=penalty, mask_A=mask_A, mask_B=mask_B)
        history.append(float(final.loss))
        return final.transform, history
    finally:
        net.load_state_dict(saved)
        net.train(was_training)
        for parameter in net.parameters():
            parameter.grad = None
