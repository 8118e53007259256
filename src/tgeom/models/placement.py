"""Where a model's weights live: the memory check before loading, and accelerate's offloaded
parameters read back on demand.

Under ``device_map="auto"`` (accelerate) a model larger than one device is spread over the GPUs,
then the CPU. Blocks kept on the CPU while the model runs on a GPU are *offloaded*: accelerate
leaves their parameters as meta tensors and moves the values in (from its weights map) around
each forward. :func:`onloaded` does the same around reading the canonical weights of such a
block.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tgeom.errors import TgeomError

DEVICE_MAPS = ("auto",)
_SAFETENSORS_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2}
_SAFETENSORS_ITEMSIZE |= {"BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_SAFETENSORS_FLOATS = ("F64", "F32", "F16", "BF16")


def weight_bytes(folder: str | Path, dtype: torch.dtype) -> int:
    """Bytes the checkpoint in ``folder`` takes once loaded in ``dtype``: its floating-point
    tensors at ``dtype``'s size, the others at their own; read from the safetensors headers
    alone (no tensor is read)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with path.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            kind = str(info["dtype"])
            size = itemsize if kind in _SAFETENSORS_FLOATS else _SAFETENSORS_ITEMSIZE.get(kind, 4)
            total += math.prod(info["shape"]) * size
    return total


def available_bytes(
    device_map: str | None, device: torch.device, max_memory: dict[Any, Any] | None = None
) -> dict[str, int]:
    """Memory the weights may take, per device: under ``device_map="auto"`` every GPU's free
    memory and the CPU's available RAM (or ``max_memory``, accelerate's format: ``{0: "20GiB",
    "cpu": "60GiB"}``); else the free memory of ``device`` alone."""
    if device_map is not None:
        from accelerate.utils import get_max_memory

        return {_name(k): int(v) for k, v in get_max_memory(max_memory).items() if k != "disk"}
    if device.type == "cuda":
        return {str(device): int(torch.cuda.mem_get_info(device)[0])}
    import psutil

    return {"cpu": int(psutil.virtual_memory().available)}


def _name(key: Any) -> str:
    return f"cuda:{key}" if isinstance(key, int) else str(key)


def check_fits(needed: int, available: dict[str, int], dtype: torch.dtype, auto: bool) -> None:
    """Refuse, in one line and before any weight is read, a model whose weights (``needed``
    bytes in ``dtype``) exceed the memory ``available`` on its devices."""
    if needed > sum(available.values()):
        raise does_not_fit(needed, available, dtype, auto)


def does_not_fit(
    needed: int, available: dict[str, int], dtype: torch.dtype, auto: bool
) -> TgeomError:
    """The one-line error for weights of ``needed`` bytes that ``available`` cannot hold (also
    raised where accelerate would offload to disk, which tgeom does not do)."""
    where = ", ".join(f"{name} {_size(n)}" for name, n in available.items())
    hint = (
        "load it on a machine with more memory"
        if auto
        else "pass --device-map auto (load_model(..., device_map='auto')) to spread it over the "
        "GPUs and the CPU"
    )
    smaller = "" if dtype in (torch.bfloat16, torch.float16) else "pass --dtype bfloat16 or "
    return TgeomError(
        f"the model does not fit: its weights need {_size(needed)} in "
        f"{str(dtype).removeprefix('torch.')} and {'the devices' if auto else 'the device'} "
        f"hold {_size(sum(available.values()))} ({where}); {smaller}{hint}."
    )


def _size(n: int) -> str:
    return f"{n:,} bytes ({n / 2**30:.2f} GiB)"


def _offloaded(module: nn.Module) -> bool:
    hook: Any = getattr(module, "_hf_hook", None)
    return bool(getattr(hook, "offload", False)) and hasattr(hook, "weights_map")


@contextmanager
def onloaded(module: nn.Module, skip: nn.Module | None = None) -> Iterator[None]:
    """Inside, every parameter of ``module`` (outside ``skip``) that accelerate offloaded holds
    its values on its execution device; afterwards the model is as before. Tensors taken inside
    keep the values they read (for an offloaded block, one block's copy on the execution
    device). A no-op for a model without offloaded parameters (plain loading, or every block on
    a device)."""
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    hooked = [m for m in module.modules() if id(m) not in skipped and _offloaded(m)]
    if not hooked:
        yield
        return
    from accelerate.utils import align_module_device

    with ExitStack() as stack:
        for m in hooked:
            stack.enter_context(align_module_device(m))
        yield
