"""GGUF files: converted once to a cached safetensors folder (SPEC section 1).

transformers dequantises GGUF weights on load (~14 s for SmolLM2-135M on 2 cores); the
converted folder loads in well under 2 s. Its weights are written in the dtype the model is
loaded in (float32 by default; bfloat16 halves the disk a large quantised model takes). The
cache lives in ``$TGEOM_CACHE`` (default ``~/.cache/tgeom``), keyed by the file's absolute
path, size and modification time, and by the dtype (a float32 folder keeps its old name). The
architecture is read from the file's header first, and one tgeom cannot analyse is refused
before anything is converted; the folder is written to a temporary folder then renamed, so a
conversion that fails or is interrupted leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import BinaryIO

import torch

from tgeom.errors import TgeomError
from tgeom.models.adapters import supported_model_types
from tgeom.results import atomic_replace
from tgeom.runtime import dtype_name

GGUF_MAGIC = b"GGUF"
# GGUF metadata value types (GGUF spec, `gguf_type`): fixed sizes; 8 = string, 9 = array
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


def cache_root() -> Path:
    return Path(os.environ.get("TGEOM_CACHE", Path.home() / ".cache" / "tgeom")).expanduser()


def cached_folder(path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """The cache folder of ``path`` converted to ``dtype``: ``STEM-DIGEST`` for float32 (the
    name caches written before dtypes had), ``STEM-DIGEST-bfloat16`` etc. otherwise."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    suffix = "" if dtype == torch.float32 else f"-{dtype_name(dtype)}"
    return cache_root() / "gguf" / f"{path.stem}-{digest}{suffix}"


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` of the GGUF file ``path`` (``llama``, ``gemma3``...), read
    from its header's key-value pairs up to that key (writers put it first: a few hundred
    bytes), without the tensors. A one-line error when the file is no GGUF or its header is cut.
    """
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise TgeomError(f"{path} is not a GGUF file (bad magic bytes); pass a valid .gguf.")
        try:
            order = _byte_order(handle)
            _, n_keys = struct.unpack(order + "QQ", _read(handle, 16))  # tensors, key-values
            for _ in range(n_keys):
                key = _read_string(handle, order)
                (kind,) = struct.unpack(order + "I", _read(handle, 4))
                if key == "general.architecture" and kind == _STRING:
                    return _read_string(handle, order)
                _skip_value(handle, order, kind)
        except (EOFError, ValueError, UnicodeDecodeError) as exc:
            raise TgeomError(
                f"cannot read the header of GGUF file {path} ({exc}); the file is corrupt or "
                "truncated: re-download it."
            ) from None
    raise TgeomError(
        f"GGUF file {path} names no architecture (no general.architecture in its metadata); "
        "pass a GGUF written by llama.cpp's converter."
    )


def _byte_order(handle: BinaryIO) -> str:
    """``<`` or ``>``: GGUF versions 2 and 3 exist, in either byte order."""
    raw = _read(handle, 4)
    for order in "<>":
        if struct.unpack(order + "I", raw)[0] in (2, 3):
            return order
    raise ValueError(f"unsupported GGUF version {struct.unpack('<I', raw)[0]}")


def _read(handle: BinaryIO, n: int) -> bytes:
    data = handle.read(n)
    if len(data) != n:
        raise EOFError("the header ends early")
    return data


def _read_string(handle: BinaryIO, order: str) -> str:
    (n,) = struct.unpack(order + "Q", _read(handle, 8))
    return _read(handle, n).decode("utf-8")


def _skip_value(handle: BinaryIO, order: str, kind: int) -> None:
    if kind == _STRING:
        (n,) = struct.unpack(order + "Q", _read(handle, 8))
        handle.seek(n, os.SEEK_CUR)
    elif kind == _ARRAY:
        item, count = struct.unpack(order + "IQ", _read(handle, 12))
        if item in _SIZES:
            handle.seek(_SIZES[item] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(handle, order, item)
    elif kind in _SIZES:
        handle.seek(_SIZES[kind], os.SEEK_CUR)
    else:
        raise ValueError(f"unknown metadata value type {kind}")


# The transformers model_type of a GGUF architecture, where the two names differ (as
# transformers' load_gguf_checkpoint renames them; Gemma 3's GGUF holds the text model only)
_MODEL_TYPES = {
    "gemma3": "gemma3_text",
    "gemma4": "gemma4_text",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}


def convertible_architectures() -> list[str]:
    """GGUF architectures tgeom converts and analyses: those transformers reads from GGUF
    whose model type an adapter handles."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    known = set(GGUF_SUPPORTED_ARCHITECTURES) | set(_MODEL_TYPES)
    handled = set(supported_model_types())
    return sorted(a for a in known if _MODEL_TYPES.get(a, a) in handled)


def convert_gguf(path: Path, dtype: torch.dtype = torch.float32) -> Path:
    """The cached safetensors folder for the GGUF file ``path`` with its weights in ``dtype``
    (converting if needed)."""
    target = cached_folder(path, dtype)
    if (target / "config.json").is_file():
        return target
    architecture = gguf_architecture(path)
    if architecture not in (supported := convertible_architectures()):
        raise TgeomError(
            f"GGUF file {path} holds architecture '{architecture}', which tgeom cannot analyse "
            f"from GGUF (it reads {', '.join(supported)}); pass a model of one of these."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True
        )
    except Exception as exc:  # the GGUF reader raises many types on corrupt or truncated files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TgeomError(
            f"cannot read GGUF file {path} ({reason[:200]}); the file is corrupt, truncated or "
            "quantised in a way transformers cannot read: re-download it."
        ) from None
    # The weights are now dense: drop what marks them as quantised.
    for holder in (model, model.config):
        for attr in ("quantization_config", "hf_quantizer"):
            if hasattr(holder, attr):
                delattr(holder, attr)
    model.is_quantized = False  # type: ignore[assignment]
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_replace(target, folder=True) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return target
