"""Model specs, the zoo, weight cache / download / verification and network construction.

Names are imported on first use, so that listing the zoo or the weight cache does not import torch.
"""

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

_EXPORTS = {
    "build_network": ".build", "ModelSpec": ".spec", "LoadedModel": ".weights", "cache_dir": ".weights",
    "cached_weights_path": ".weights", "download_weights": ".weights", "install_weights": ".weights",
    "load_model": ".weights", "read_state_dict": ".weights", "sha256_of": ".weights", "weights_state": ".weights",
    "DEFAULT_MODEL": ".zoo", "model_names": ".zoo", "resolve_spec": ".zoo", "zoo_spec": ".zoo",
}

__all__ = list(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from .build import build_network
    from .spec import ModelSpec
    from .weights import (LoadedModel, cache_dir, cached_weights_path, download_weights, install_weights,
                          load_model, read_state_dict, sha256_of, weights_state)
    from .zoo import DEFAULT_MODEL, model_names, resolve_spec, zoo_spec
