"""Model specs, the zoo, weight cache / download / verification and network construction."""

from .build import build_network
from .spec import ModelSpec
from .weights import (LoadedModel, cache_dir, cached_weights_path, download_weights, install_weights, load_model,
                      read_state_dict, sha256_of, weights_state)
from .zoo import DEFAULT_MODEL, model_names, resolve_spec, zoo_spec

__all__ = ["build_network", "ModelSpec", "LoadedModel", "cache_dir", "cached_weights_path", "download_weights",
           "install_weights", "load_model", "read_state_dict", "sha256_of", "weights_state", "DEFAULT_MODEL",
           "model_names", "resolve_spec", "zoo_spec"]
