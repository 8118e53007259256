"""GGUF files: converted once to a cached float32 safetensors folder (SPEC section 1).

transformers dequantises GGUF weights to float32 on load (~14 s for SmolLM2-135M on 2 cores);
the converted folder loads in well under 2 s. The cache lives in ``$TGEOM_CACHE`` (default
``~/.cache/tgeom``), keyed by the file's absolute path, size and modification time, and is written
to a temporary folder then renamed, so an interrupted conversion leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from tgeom.errors import TgeomError

GGUF_MAGIC = b"GGUF"


def cache_root() -> Path:
    return Path(os.environ.get("TGEOM_CACHE", Path.home() / ".cache" / "tgeom")).expanduser()


def cached_folder(path: Path) -> Path:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{path.stem}-{digest}"


def convert_gguf(path: Path) -> Path:
    """The cached float32 safetensors folder for the GGUF file ``path`` (converting if needed)."""
    target = cached_folder(path)
    if (target / "config.json").is_file():
        return target
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise TgeomError(f"{path} is not a GGUF file (bad magic bytes); pass a valid .gguf.")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype="float32", local_files_only=True
        )
        tokenizer = AutoTokenizer.from_pretrained(
            path.parent, gguf_file=path.name, local_files_only=True
        )
    except Exception as exc:  # the GGUF reader raises many types on corrupt or truncated files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TgeomError(
            f"cannot read GGUF file {path} ({reason[:200]}); the file is corrupt, truncated or "
            "of an unsupported architecture: re-download it."
        ) from None
    # The weights are now dense float32: drop what marks them as quantised.
    for holder in (model, model.config):
        for attr in ("quantization_config", "hf_quantizer"):
            if hasattr(holder, attr):
                delattr(holder, attr)
    model.is_quantized = False  # type: ignore[assignment]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
