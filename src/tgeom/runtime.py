"""Device, dtype and batch size, chosen in one place and passed down to every analysis."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from tgeom.errors import TgeomError

# The precisions a model can be loaded in (``--dtype``); float32 is the default.
DtypeName = Literal["float32", "bfloat16", "float16"]
DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in get_args(DtypeName)}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` (or ``torch.bfloat16``) -> ``torch.bfloat16``; a one-line TgeomError for
    any precision outside :data:`DTYPES`."""
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return value
    raise TgeomError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}.")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (the name ``--dtype`` takes and results record)."""
    return str(dtype).removeprefix("torch.")


def check_dtype_runs(dtype: torch.dtype, device: torch.device) -> None:
    """Refuse, in one line naming both, a precision ``device`` cannot compute in: a tiny matmul
    and softmax in ``dtype`` on ``device`` must run and give the float64 answer to within the
    dtype's rounding (a CPU build without float16 kernels, bfloat16 on a GPU older than
    Ampere)."""
    a = torch.arange(1.0, 7.0, dtype=torch.float64).reshape(2, 3) / 4
    expected = (a @ a.T).softmax(-1)
    try:
        x = a.to(device=device, dtype=dtype)
        got = (x @ x.T).softmax(-1).to(device="cpu", dtype=torch.float64)
    except (RuntimeError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TgeomError(
            f"dtype {dtype_name(dtype)} does not run on device {device} ({reason[:120]}); "
            "pass another --dtype (float32 runs everywhere)."
        ) from None
    if not torch.allclose(got, expected, rtol=0, atol=8 * torch.finfo(dtype).eps):
        raise TgeomError(
            f"dtype {dtype_name(dtype)} computes wrongly on device {device} (a 2x3 matmul is "
            "off); pass another --dtype (float32 runs everywhere)."
        )


@contextmanager
def one_cpu_thread(device: torch.device | str = "cpu") -> Iterator[None]:
    """Run the block on one intra-op thread when ``device`` is the CPU (the setting is per
    thread; restored after). For LAPACK calls on small matrices (QR, SVD, eigenvalues of
    ``[d, d_head]`` or ``[d_head, d_head]`` factors): threads gain nothing there and lose much
    when the cores are shared (Gemma 3's ``[4, 640, 256]`` QR on 2 cores beside another busy
    process: 2.24 s on 2 threads, 0.056 s on one)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def default_device() -> torch.device:
    """This process' CUDA device when one is present (``LOCAL_RANK`` under torchrun, else the
    first), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def retain_freed_memory(block_bytes: int = 1 << 20, kept_bytes: int = 1 << 30) -> bool:
    """Fix glibc's ``malloc`` policy for the process: blocks below ``block_bytes`` come from its
    heap, which keeps up to ``kept_bytes`` of freed memory for reuse instead of trimming it;
    blocks of ``block_bytes`` or more are always mapped on their own and unmapped when freed.

    Small blocks are reused without first-touch page faults. Large tensors are not served from
    the heap: there, glibc's aligned allocations (torch asks for 64-byte alignment) leave
    small free pieces beside each large block, small allocations take them, and a large block
    freed next to them no longer fits the next one of its size, so the heap grew by one large
    block per use: output_factors' float64 ``W_O`` (33.5 MB per layer) left all 22 resident.
    1.1B Llama in bfloat16 on one thread, peak RSS (weights 2.05 GiB) with blocks up to 256 MB /
    32 MB / 1 MB from the heap: attention effective 3.34 / 3.04 / 2.97 GiB, geometry collect
    2.77 / - / 2.69 GiB, weights topk 3.01 / 2.85 GiB (glibc's own dynamic threshold, up to
    32 MB: effective 3.04, topk 2.89). Mapped anew, a
    large block pays its page faults once per use, as with glibc's defaults. The CLI calls it at
    start-up; library users may. Process-wide. Returns False (and changes nothing) where the C
    library is not glibc."""
    name = ctypes.util.find_library("c")
    if name is None or os.name != "posix":
        return False
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 (present in glibc only)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, block_bytes)) and bool(
        mallopt(_M_TRIM_THRESHOLD, kept_bytes)
    )


@dataclass(frozen=True)
class Runtime:
    """Where and how tensors are computed.

    ``device``: where forward passes and large products run. ``dtype``: the model's compute
    dtype (accumulators are always float64). ``batch_size``: windows per forward pass.
    """

    device: torch.device
    dtype: torch.dtype = torch.float32
    batch_size: int = 8

    @classmethod
    def auto(cls, batch_size: int | None = None) -> Runtime:
        device = default_device()
        if batch_size is None:
            batch_size = 32 if device.type == "cuda" else 8
        return cls(device=device, batch_size=batch_size)
