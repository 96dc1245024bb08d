"""The model zoo: named ``ModelSpec`` entries shipped with the package (``zoo.json``)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from ..errors import UserError
from .spec import ModelSpec

ZOO_FILE = Path(__file__).with_name("zoo.json")
#: weights of the models the project trains and ships (``"bundled": true`` in the zoo) live here
BUNDLED_DIR = Path(__file__).with_name("bundled")
DEFAULT_MODEL = "unigradicon"


@lru_cache(maxsize=1)
def _entries() -> dict[str, dict]:
    return {entry["name"]: entry for entry in json.loads(ZOO_FILE.read_text(encoding="utf-8"))}


def model_names() -> list[str]:
    """Names of the zoo's models, in the order of ``zoo.json``."""
    return list(_entries())


def zoo_spec(name: str) -> ModelSpec:
    """The ``ModelSpec`` of zoo model ``name``."""
    entries = _entries()
    if name not in entries:
        raise UserError(f"Unknown model '{name}'. Known models: {', '.join(entries)}; "
                        "or pass the path of a model spec JSON file.")
    spec = ModelSpec.from_dict(entries[name])
    if spec.weights.get("bundled"):
        spec.extra["spec_dir"] = str(BUNDLED_DIR)
    return spec


def resolve_spec(model: "str | Path | ModelSpec") -> ModelSpec:
    """A ``ModelSpec`` from a zoo name, a spec JSON path, or a ``ModelSpec`` (returned as is)."""
    if isinstance(model, ModelSpec):
        return model
    text = str(model)
    if text in _entries():
        return zoo_spec(text)
    if text.endswith(".json") or Path(text).is_file():
        return ModelSpec.from_file(text)
    return zoo_spec(text)
