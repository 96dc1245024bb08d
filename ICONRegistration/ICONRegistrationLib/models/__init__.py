"""Model specs, the zoo, weight cache / download / verification and network construction.

Names are imported on first use, so that listing the zoo or the weight cache does not import torch.
"""

import importlib

_EXPORTS = {
    "build_network": ".build", "ModelSpec": ".spec", "LoadedModel": ".weights", "cache_dir": ".weights",
    "cached_weights_path": ".weights", "download_weights": ".weights", "install_weights": ".weights",
    "load_model": ".weights", "read_state_dict": ".weights", "sha256_of": ".weights", "weights_state": ".weights",
    "DEFAULT_MODEL": ".zoo", "model_names": ".zoo", "resolve_spec": ".zoo", "zoo_spec": ".zoo",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
