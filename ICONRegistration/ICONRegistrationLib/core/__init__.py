"""Core maths on the network grid: coordinate maps, networks, registration modules, losses (torch only)."""

from .coordinates import (compose, displacement_jacobian_determinant, displacement_to_map, evaluate_map, fold_count,
                          identity_map, is_identity, jacobian_determinant, map_to_displacement, mark_identity, sample_at)
from .losses import (LNCC, MINDSSC, SSD, SquaredLNCC, gaussian_blur, gradicon_penalty, icon_penalty,
                     jittered_identity, make_similarity, masked_mean)
from .objective import ObjectiveTerms, symmetric_objective
from .networks import UNet2, tallUNet2
from .registration_modules import (Down, DownsampleRegistration, FunctionFromVectorField, RegistrationModule,
                                   Transform, TwoStep, TwoStepRegistration)

__all__ = [
    "compose", "displacement_jacobian_determinant", "displacement_to_map", "evaluate_map", "fold_count",
    "identity_map", "is_identity",
    "jacobian_determinant", "map_to_displacement", "mark_identity", "sample_at",
    "LNCC", "MINDSSC", "SSD", "SquaredLNCC", "gaussian_blur", "gradicon_penalty", "icon_penalty",
    "jittered_identity", "make_similarity", "masked_mean",
    "ObjectiveTerms", "symmetric_objective",
    "UNet2", "tallUNet2",
    "Down", "DownsampleRegistration", "FunctionFromVectorField", "RegistrationModule", "Transform",
    "TwoStep", "TwoStepRegistration",
]
