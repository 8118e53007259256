"""Shared fixtures: tiny random models of every family, the real offline models, output dirs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tgeom.models import LoadedModel, load_model
from tiny_models import save_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], LoadedModel]:
    """``tiny_model(family)``: a LoadedModel of a tiny random model, saved and loaded back."""
    cache: dict[str, LoadedModel] = {}

    def get(family: str) -> LoadedModel:
        if family not in cache:
            folder = save_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
            cache[family] = load_model(str(folder), device="cpu")
        return cache[family]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``tiny_model_dir(family)``: the folder of a saved tiny model (for CLI tests)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = save_tiny_model(family, tmp_path_factory.mktemp(f"tinydir-{family}"))
        return cache[family]

    return get


@pytest.fixture(scope="session")
def minilm() -> LoadedModel:
    return load_model("minilm", device="cpu")


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="session")
def gemma3() -> LoadedModel:
    return load_model("gemma3", device="cpu")


@pytest.fixture
def tmp_out(tmp_path: Path) -> Path:
    return tmp_path / "out"
