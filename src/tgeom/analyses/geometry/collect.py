"""First (and only) pass over a corpus: batched forward passes feeding :class:`GeometryStats`.

[SZ] / SPEC section 4, streaming. Each batch's hidden states ``[L+1, B, T, d]`` are folded into
float64 running sums on the runtime's device and dropped (with ``second_moment``, also each
hidden state's ``sum h h^T [d, d]``, one float64 GEMM per hidden state and batch); only the
per-window means ``[C, L+1, d]`` grow with the corpus. With ``checkpoint_path`` the statistics
are saved atomically every ``checkpoint_every`` batches (and at the end); a later call with the
same model, windows and options resumes after the ``n_done`` windows the checkpoint holds, so
none is counted twice.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tgeom.analyses.geometry.stats import GeometryStats
from tgeom.capture import stream_hidden
from tgeom.capture.distributed import Shard, shard_from_env
from tgeom.errors import TgeomError
from tgeom.runtime import Runtime


def windows_fingerprint(token_ids: Tensor) -> str:
    """sha256 of the windows' token ids (int64, row-major): identifies the exact windows."""
    data = token_ids.to(torch.int64).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


def stats_identity(lm: Any, windows: Any, keep_first: bool, corpus: str | None) -> dict[str, Any]:
    """What a statistics file must agree on to be resumed or compared."""
    return {
        "model": str(lm.source),
        "dtype": str(lm.identity["dtype"]),
        "n_blocks": int(lm.summary.n_layers),
        "n_hidden": int(lm.summary.n_layers) + 1,
        "d_model": int(lm.summary.d_model),
        "seq_len": int(windows.seq_len),
        "corpus": corpus,
        "windows_sha256": windows_fingerprint(windows.token_ids),
        "n_windows": len(windows),
        "topics": list(windows.topics),
        "topic_ids": windows.topic_ids.tolist(),
        "options": {"keep_first": bool(keep_first)},
    }


def check_same_identity(
    found: dict[str, Any],
    wanted: dict[str, Any],
    where: str,
    fix: str = "use a fresh --out folder.",
) -> None:
    """Raise a one-line TgeomError naming the first field where two identities differ."""
    names = {
        "model": "model",
        "dtype": "--dtype",
        "seq_len": "--seq-len",
        "options": "options (--keep-first)",
        "corpus": "corpus",
        "windows_sha256": "windows (corpus, --max-windows-per-topic or tokenizer)",
        "d_model": "d_model",
        "n_blocks": "number of blocks",
    }
    for key, label in names.items():
        was, now = found.get(key, _BEFORE.get(key)), wanted.get(key, _BEFORE.get(key))
        if was != now:
            raise TgeomError(
                f"the statistics at {where} come from another {label} ({was!r}, here {now!r}); "
                f"{fix}"
            )


# What an identity written before a field existed meant by its absence
_BEFORE = {"dtype": "float32"}


@torch.no_grad()
def collect_statistics(
    lm: Any,
    windows: Any,
    runtime: Runtime | None = None,
    *,
    keep_first: bool = False,
    checkpoint_path: str | Path | None = None,
    checkpoint_every: int = 16,
    progress: bool = True,
    corpus: str | None = None,
    shard: Shard | None = None,
    second_moment: bool = True,
) -> GeometryStats:
    """Accumulate the running sums of every hidden state (0..L) over ``windows``.

    ``lm``: a LoadedModel; ``windows``: :class:`tgeom.corpus.Windows` (``token_ids [C, T]``).
    Position 0 is dropped unless ``keep_first`` (so T' = T - 1 positions by default).
    Returns float64 :class:`GeometryStats` with ``mu``, ``pos_t`` and ``ctx_c`` available exactly
    and the variance shares exact from this single pass (balanced two-way ANOVA: total SS =
    C sum_t ||pos_t||^2 + T' sum_c ||ctx_c||^2 + resid SS; see :mod:`.stats`).
    ``corpus`` is the corpus identity recorded in the file (e.g. ``Corpus.source``).
    ``shard``: this process' rank in a ``torchrun`` job (default: read from the environment);
    see :func:`_collect_sharded`. ``second_moment``: also accumulate ``sum h h^T [L+1, d, d]``
    (the raw operator norm of [SZ]'s relative norm; ``8 (L+1) d^2`` bytes).
    """
    shard = shard if shard is not None else shard_from_env()
    if shard.distributed:
        return _collect_sharded(
            lm,
            windows,
            runtime,
            shard,
            keep_first,
            checkpoint_path,
            checkpoint_every,
            progress,
            corpus,
            second_moment,
        )
    runtime = runtime or Runtime.auto()
    seq_len = int(windows.seq_len)
    n_ctx = getattr(lm.summary, "n_ctx", None)
    if n_ctx is not None and seq_len > int(n_ctx):
        raise TgeomError(f"--seq-len {seq_len} is longer than the model context ({n_ctx}).")
    first = 0 if keep_first else 1
    if seq_len - first < 2:
        raise TgeomError(f"--seq-len {seq_len} leaves fewer than 2 positions; pass at least 3.")
    if len(windows) < 1:
        raise TgeomError("the corpus gave no window; pass a smaller --seq-len or more text.")
    identity = stats_identity(lm, windows, keep_first, corpus)
    n_hidden = int(lm.summary.n_layers) + 1  # embedding output + each block's output
    d = int(lm.summary.d_model)

    stats = _resume(checkpoint_path, identity, second_moment)
    if stats is None:
        stats = GeometryStats.empty(
            n_hidden, seq_len - first, len(windows), d, identity, second_moment
        )
    device = runtime.device
    acc = {name: value.to(device) for name, value in stats.running_sums().items()}
    token_ids = windows.token_ids[stats.n_done :]
    bar = _progress(progress, len(windows), stats.n_done)
    n_positions = seq_len - first
    for batches, start in enumerate(range(0, token_ids.shape[0], runtime.batch_size), start=1):
        batch_ids = token_ids[start : start + runtime.batch_size]
        window_sums = torch.empty(
            batch_ids.shape[0], n_hidden, d, dtype=torch.float64, device=device
        )

        def fold(index: int, hidden: Tensor, window_sums: Tensor = window_sums) -> None:
            window_sums[:, index] = _fold_hidden(acc, index, hidden, first)

        stream_hidden(lm, batch_ids, fold)
        row = stats.n_done
        stats.ctx_means[row : row + batch_ids.shape[0]] = (window_sums / n_positions).cpu()
        stats.n_done = row + batch_ids.shape[0]
        if bar is not None:
            bar.update(stats.n_done)
        if checkpoint_path is not None and batches % max(checkpoint_every, 1) == 0:
            _store(stats, acc).save(checkpoint_path)
    if bar is not None:
        bar.close()
    _store(stats, acc)
    if checkpoint_path is not None:
        stats.save(checkpoint_path)
    return stats


@dataclass
class _WindowSlice:
    """Rows ``[lo, hi)`` of a Windows object (what one rank of a sharded job processes)."""

    token_ids: Tensor
    topic_ids: Tensor
    topics: list[str]
    seq_len: int

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


def _collect_sharded(
    lm: Any,
    windows: Any,
    runtime: Runtime | None,
    shard: Shard,
    keep_first: bool,
    checkpoint_path: str | Path | None,
    checkpoint_every: int,
    progress: bool,
    corpus: str | None,
    second_moment: bool,
) -> GeometryStats:
    """One rank of a ``torchrun`` job: collect a contiguous block of windows (with its own
    resumable checkpoint), then all-reduce the float64 sums so every rank holds the statistics
    of the whole corpus; rank 0 writes them. Equal to the single-process result up to the order
    of float64 additions (max abs diff ~1e-12 relative)."""
    rows = shard.indices(len(windows))
    lo, hi = int(rows[0]) if len(rows) else 0, int(rows[-1]) + 1 if len(rows) else 0
    part_path = None
    if checkpoint_path is not None:
        from tgeom.analyses.geometry.stats import _stats_path

        base = _stats_path(checkpoint_path)
        base.parent.mkdir(parents=True, exist_ok=True)
        part_path = base.with_name(
            f".{base.stem}.rank{shard.rank}-of-{shard.world_size}.safetensors"
        )
    identity = stats_identity(lm, windows, keep_first, corpus)
    first = 0 if keep_first else 1
    total = GeometryStats.empty(
        int(lm.summary.n_layers) + 1,
        int(windows.seq_len) - first,
        len(windows),
        int(lm.summary.d_model),
        identity,
        second_moment,
    )
    if hi > lo:
        part_windows = _WindowSlice(
            windows.token_ids[lo:hi],
            windows.topic_ids[lo:hi],
            list(windows.topics),
            int(windows.seq_len),
        )
        part = collect_statistics(
            lm,
            part_windows,
            runtime,
            keep_first=keep_first,
            checkpoint_path=part_path,
            checkpoint_every=checkpoint_every,
            progress=progress and shard.is_main,
            corpus=corpus,
            shard=Shard(),
            second_moment=second_moment,
        )
        for name, value in part.running_sums().items():
            setattr(total, name, value.clone())
        total.ctx_means[lo:hi] = part.ctx_means
    sums = {**total.running_sums(), "ctx_means": total.ctx_means}
    shard.all_reduce_sum(sums)
    total.n_done = len(windows)
    if checkpoint_path is not None and shard.is_main:
        total.save(checkpoint_path)
    shard.barrier()
    return total


def _fold_hidden(acc: dict[str, Tensor], index: int, hidden: Tensor, first: int) -> Tensor:
    """Fold hidden state ``index``'s batch ``hidden [B, T, d]`` (positions ``first:``) into the
    float64 sums ``acc[...][index]``; return its per-window sums over positions ``[B, d]``
    (float64).

    Called from the block's forward hook, while the block's output is still in cache. One float64
    copy (exact: float32 -> float64 loses nothing), two sums and (when ``acc`` has it) the second
    moment ``h^T h`` read from it, then ``|h|`` and ``h^2`` are formed *in place* in that copy, so
    no other temporary of its size is allocated.
    """
    # copy=True: a float64 model's output would otherwise be this very tensor, and the in-place
    # |h| and h^2 below would overwrite what the next block reads.
    h = hidden[:, first:].to(device=acc["sum_pos"].device, dtype=torch.float64, copy=True)
    if "second_moment" in acc:
        flat = h.reshape(-1, h.shape[-1])  # [B T', d]
        acc["second_moment"][index].addmm_(flat.T, flat)
    acc["sum_pos"][index] += h.sum(dim=0)
    window_sums = h.sum(dim=1)
    acc["sum_total"][index] += window_sums.sum(dim=0)
    acc["sum_abs"][index] += h.abs_().sum(dim=(0, 1))
    acc["sumsq"][index] += h.mul_(h).sum(dim=(0, 1))
    return window_sums


def _store(stats: GeometryStats, acc: dict[str, Tensor]) -> GeometryStats:
    for name, value in acc.items():
        setattr(stats, name, value.cpu())
    return stats


def _resume(
    path: str | Path | None, identity: dict[str, Any], second_moment: bool
) -> GeometryStats | None:
    if path is None:
        return None
    from tgeom.analyses.geometry.stats import _stats_path

    target = _stats_path(path)
    if not target.is_file():
        return None
    stats = GeometryStats.load(target)
    check_same_identity(stats.meta, identity, str(target))
    if (stats.second_moment is not None) != second_moment:
        held = "with" if stats.second_moment is not None else "without"
        flag = "omit --no-second-moment" if held == "with" else "pass --no-second-moment"
        raise TgeomError(
            f"the statistics at {target} were collected {held} the [d, d] second moment; "
            f"{flag} to continue them, or use a fresh --out."
        )
    return stats


class _Bar:
    """A minimal stderr progress line (rich is avoided to keep CLI output plain in logs)."""

    def __init__(self, total: int, done: int) -> None:
        from rich.progress import Progress

        self._progress = Progress(transient=True)
        self._task = self._progress.add_task("collect", total=total, completed=done)
        self._progress.start()

    def update(self, done: int) -> None:
        self._progress.update(self._task, completed=done)

    def close(self) -> None:
        self._progress.stop()


def _progress(enabled: bool, total: int, done: int) -> _Bar | None:
    return _Bar(total, done) if enabled else None
