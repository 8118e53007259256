"""Attention null spaces and effective attention [BRU] (SPEC section 5).

For one sequence of ``n`` real tokens, layer ``l`` and head ``h``: ``T = V W_O[h]`` (``[n, d]``,
``V = X W_V + b_V`` the head's value vectors, bias included). Attention ``A [n, n]`` is
identifiable only when the left null space of ``T`` is trivial; its dimension is
``n - rank(T)`` (float64; relative tolerance ``max(n, d) * eps(float32)`` by default, as
``V`` and ``W_O`` are stored in float32, see :mod:`tgeom.linalg.nullspace`), non-trivial
whenever ``n > d_head``.
Effective attention ``A_eff = A - A N N^T`` (N an orthonormal basis of that null space) gives the
same head output (``A_eff T = A T``) and equals ``A`` when the null space is trivial.

Computation (exact, cheaper than a full SVD of ``T``): with ``W_O[h]^T = Q R`` (thin QR, ``Q``
``[d, dh]`` orthonormal), ``T = (V R^T) Q^T`` has the singular values and left singular vectors
of the small ``M = V R^T [n, dh]``, and ``A_eff = A P`` with ``P`` the projector on the range
of ``M`` (:mod:`tgeom.analyses.identifiability.projection`: a Cholesky-certified basis, a
``[dh, dh]`` Gram eigendecomposition with refinement, or an SVD of ``M`` for tolerances below
1e-5). When ``R`` is invertible the range of ``M`` is that of ``V``, so heads whose ``V``
proves ``M`` full rank (``cond(M) <= cond(V) cond(R)``) never form ``M``. Heads with a trivial
null space keep ``A`` bit for bit. ``V`` and ``A`` are the ones the model computes, taken by
hooks during its forward pass; each bidirectional layer is processed as soon as its attention
exists, causal layers on the CPU after the forward pass, spread over worker threads; each
sequence is cut to its own length (padding never enters ``T``).

Causal (decoder) heads: query ``i`` sees only ``T[:i+1]``, so its null space is that of the prefix
(:mod:`tgeom.analyses.identifiability.causal`): effective attention stays causal and a query's
row does not change when text is appended. ``null_dim`` is always that of the whole sequence.

Sliding-window layers (Mistral, Qwen2, GPT-Neo's local layers): query ``i`` sees only the keys of
its window, so its null space and effective row are those of the window's rows of ``T``
(:mod:`tgeom.analyses.identifiability.windows`, one float64 SVD per query window); its row is
zero outside the window. Sequences no longer than the window take the causal path above (the
window is then the prefix), and so do the first ``w`` queries of longer ones: only the later
queries take a per-window SVD. ``null_dim`` of a windowed head is the largest over its queries'
windows (generic heads: ``max(0, min(n, w) - d_head)``; ``n - rank(T)`` for every other head).

Effective attention can be negative and need not sum to 1: the token-type summaries report both
the signed mean and the mean of absolute values (figures use the signed one and say so).
"""

from __future__ import annotations

import os
import string
import threading
import unicodedata
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property, partial
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor

from tgeom.analyses.identifiability.causal import prefix_effective_attention
from tgeom.analyses.identifiability.projection import HeadProjectors, sequence_rank
from tgeom.analyses.identifiability.sequences import null_space_warnings
from tgeom.analyses.identifiability.windows import (
    window_effective_attention,
    window_null_dims,
    window_ranks,
)
from tgeom.capture import stream_hidden
from tgeom.linalg.nullspace import default_rtol
from tgeom.models.weights import attention_window, window_keys
from tgeom.results import results_frame
from tgeom.runtime import Runtime, one_cpu_thread

if TYPE_CHECKING:
    import pandas as pd

TOKEN_TYPES = ("cls/bos", "sep/eos", "punctuation", "other")
TYPE_SUMS = ("raw_signed", "raw_abs", "effective_signed", "effective_abs")  # token-type summaries
SUMMARY_TABLES = (
    "pearson",
    "pearson_by_block",
    "pearson_by_length",
    *(f"token_type_attention.{name}" for name in TYPE_SUMS),
)


@dataclass
class SequenceAttention:
    """One sequence: ``raw [L, H, n, n]`` (the model's attention probabilities, in its dtype),
    ``effective [L, H, n, n]`` (float64), both on the CPU (for causal models, strided views of
    one block shared by the sequences of a length: ``.contiguous()`` before ``.view``);
    ``null_dim, rank [L, H]``."""

    token_ids: list[int]
    raw: Tensor
    effective: Tensor
    null_dim: Tensor
    rank: Tensor


def real_lengths(token_ids: Tensor, attention_mask: Tensor | None) -> list[int]:
    """Real tokens per row (right padding); the mask must be 1s then 0s."""
    if attention_mask is None:
        return [int(token_ids.shape[1])] * int(token_ids.shape[0])
    return [int(n) for n in attention_mask.sum(1).tolist()]


class OutputFactors(NamedTuple):
    """Per layer and head: ``right [L, H, dh, dh]`` float64 (``R^T`` with ``W_O[l, h] = R^T
    Q^T``, ``Q`` orthonormal columns), ``cond2 [L, H]`` (``cond(R)^2``, inf for a rank-deficient
    ``W_O[l, h]``) and ``smin [L, H]`` (the smallest singular value of ``R``)."""

    right: Tensor
    cond2: Tensor
    smin: Tensor


_FACTORS: dict[int, tuple[weakref.ref[Any], tuple[Any, ...], OutputFactors]] = {}


def output_factors(lm: Any, device: torch.device) -> OutputFactors:
    """:class:`OutputFactors` of every layer's ``W_O``, on ``device``.

    Cached per model; the key holds each ``W_O``'s storage and version counter, so an in-place
    edit of a weight (as in a test planting a rank-deficient head) recomputes it."""
    key = (str(device), *((lw.W_O.data_ptr(), lw.W_O._version) for lw in lm.weights().layers))
    cached = _FACTORS.get(id(lm))
    if cached is not None and cached[0]() is lm and cached[1] == key:
        return cached[2]
    # one block's W_O in float64 at a time (all of them: 8 L d^2 bytes, a third of a 1B model);
    # small LAPACK calls, on one thread (see one_cpu_thread)
    with one_cpu_thread(device):
        R = torch.stack(
            [
                torch.linalg.qr(
                    lw.W_O.to(device, torch.float64).transpose(-1, -2), mode="reduced"
                ).R
                for lw in lm.weights().layers
            ]
        )  # [L, H, dh, dh]
        s = torch.linalg.svdvals(R)
    cond2 = torch.where(s[..., -1] > 0, (s[..., 0] / s[..., -1]) ** 2, torch.inf)
    factors = OutputFactors(R.transpose(-1, -2), cond2, s[..., -1])
    for stale in [k for k, (ref, _, _) in _FACTORS.items() if ref() is None]:
        del _FACTORS[stale]
    _FACTORS[id(lm)] = (weakref.ref(lm), key, factors)
    return factors


def _prefix_rtol(m: int, *, d: int, dtype: torch.dtype, rtol: float | None) -> float:
    """Relative rank tolerance for a prefix of ``m`` tokens (causal heads)."""
    return default_rtol(m, d, dtype) if rtol is None else rtol


@torch.no_grad()
def effective_attention_batch(
    lm: Any,
    token_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    need_attention: bool = True,
    rtol: float | None = None,
) -> list[SequenceAttention]:
    """Raw and effective attention of every layer and head for each sequence of a batch
    (``token_ids [B, T]``, right padding marked by ``attention_mask``); ``rtol`` is the relative
    rank tolerance (default ``max(n, d) * eps`` of the stored values' dtype).

    One forward pass of its own; :func:`effective_attention_hooks` gives the same from a forward
    pass shared with other analyses."""
    hooks = effective_attention_hooks(
        lm, token_ids, attention_mask, need_attention=need_attention, rtol=rtol
    )
    stream_hidden(
        lm,
        token_ids,
        lambda *_: None,
        attention_mask,
        attentions=need_attention,
        values=hooks.values,
        attention_weights=hooks.attention if need_attention else None,
    )
    return hooks.finish()


class EffectiveHooks(NamedTuple):
    """What :func:`effective_attention_hooks` returns: hand ``values`` and ``attention`` to
    :func:`tgeom.capture.stream_hidden` (``values=``, ``attention_weights=``; the latter only
    when the attention is needed), then call ``finish()`` once after the forward pass for the
    sequences' :class:`SequenceAttention`."""

    values: Callable[[int, Tensor], None]
    attention: Callable[[int, Tensor], None]
    finish: Callable[[], list[SequenceAttention]]


def effective_attention_hooks(
    lm: Any,
    token_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    need_attention: bool = True,
    rtol: float | None = None,
) -> EffectiveHooks:
    """The work of :func:`effective_attention_batch`, as hooks on a forward pass the caller
    runs (so one pass can feed other analyses too); same arguments, same results.

    One forward pass; each layer's attention probabilities are taken as soon as they exist,
    the sequences of each length together (float64): nothing of size ``[L, B, H, T, T]`` is
    stacked. Bidirectional heads, processed there (the attention and the value vectors still
    in cache): one projector per head, applied one sequence at a time so that its float64 copy
    of the attention stays in cache, into each sequence's own result tensors; work buffers are
    reused by every layer and call (see :func:`_workspace`). Causal heads: a length group at a
    time, in place in one ``[L, g, H, n, n]`` result block per length whose ``[:, j]`` views are
    the sequences' results, copied there during the forward pass and projected in place after
    it (on the CPU, the layers spread over worker threads: :func:`_project_on_workers`)."""
    n_layers, n_heads = int(lm.summary.n_layers), int(lm.summary.n_heads)
    device, d = lm.device, int(lm.summary.d_model)
    lengths = real_lengths(token_ids, attention_mask)
    groups: dict[int, list[int]] = {}
    for b, n in enumerate(lengths):
        groups.setdefault(n, []).append(b)
    factors = output_factors(lm, device)
    group = n_heads // int(lm.summary.n_kv_heads)  # query heads per KV head
    causal = bool(lm.summary.is_causal)
    raw: list[Tensor] = [torch.empty(0)] * len(lengths)
    eff: list[Tensor] = [torch.empty(0)] * len(lengths)
    blocks: dict[int, tuple[Tensor, Tensor]] = {}  # causal: per length, [L, g, H, n, n] each
    for n, members in groups.items() if need_attention else ():  # rank-only runs keep none
        if causal:  # a layer of a length group is one contiguous block, processed in place
            shape = (n_layers, len(members), n_heads, n, n)
            blocks[n] = (
                torch.empty(shape, device=device),
                torch.empty(shape, dtype=torch.float64, device=device),
            )
            for j, b in enumerate(members):  # each sequence's results: views of the blocks
                raw[b], eff[b] = blocks[n][0][:, j], blocks[n][1][:, j]
        else:
            for b in members:
                raw[b] = torch.empty(n_layers, n_heads, n, n, device=device)
                eff[b] = torch.empty(n_layers, n_heads, n, n, dtype=torch.float64, device=device)
    ranks = torch.empty(len(lengths), n_layers, n_heads, dtype=torch.long)
    # windowed layers on sequences longer than the window: null dims of their own (-1: n - rank)
    nulls = torch.full_like(ranks, -1)
    windows = [attention_window(lm.summary, layer) for layer in range(n_layers)]
    values: list[Tensor | None] = [None] * n_layers  # [B, H, T, dh], as the model computed them

    def by_length(V: Tensor) -> Iterator[tuple[int, list[int], Tensor | slice, float, Tensor]]:
        """Per length group: ``n``, its members, their index, the tolerance and their values
        ``[g, H, n, dh]`` (float64, contiguous: ``V`` is a strided view of the projection;
        causal heads: ``[g, K, n, dh]``, the KV heads, which ``V`` repeats for their query
        heads)."""
        heads = slice(None, None, group if causal and need_attention else 1)
        for n, members in groups.items():
            idx: Tensor | slice = (
                slice(members[0], members[-1] + 1)  # a view, no gather
                if members == list(range(members[0], members[-1] + 1))
                else torch.tensor(members, device=device)
            )
            tol = default_rtol(n, d, V.dtype) if rtol is None else rtol
            Vn = V[idx, heads, :n].to(torch.float64, memory_format=torch.contiguous_format)
            yield n, members, idx, tol, Vn

    # Causal layers on the CPU: the forward pass only copies each layer's attention into its
    # block; the projections (mostly small single-threaded LAPACK calls) run after it, the
    # layers spread over one worker thread per intra-op thread (see _project_on_workers).
    # Bidirectional layers are two multi-threaded GEMMs per head, done here; CUDA runs
    # asynchronously anyway.
    deferred: list[Callable[[], None]] | None = (
        [] if causal and device.type == "cpu" and need_attention else None
    )

    def keep_values(layer: int, V: Tensor) -> None:
        V = V.to(device)  # the block's device under device_map="auto"
        if need_attention:
            values[layer] = V
            return
        for n, members, _, tol, Vn in by_length(V):  # the ranks need the values only
            M = torch.einsum("bhtd,hde->bhte", Vn, factors.right[layer])
            window = windows[layer]
            if window and n > window:
                rtol_for = partial(_prefix_rtol, d=d, dtype=V.dtype, rtol=rtol)
                null, rank = window_null_dims(window_ranks(M, rtol_for, window), window)
                ranks[members, layer], nulls[members, layer] = rank.cpu(), null.cpu()
                continue
            ranks[members, layer] = sequence_rank(M, tol).cpu()

    def process(layer: int, attention: Tensor) -> None:  # attention [B, H, T, T]
        V = values[layer]
        assert V is not None
        values[layer] = None
        attention = attention.to(device)
        for n, members, idx, tol, Vn in by_length(V):
            if causal:
                raw_block = blocks[n][0][layer].copy_(attention[idx, :, :n, :n])  # [g, H, n, n]
                job = partial(project_causal, layer, n, members, raw_block, Vn, V.dtype)
                job() if deferred is None else deferred.append(job)
            else:  # M = V R^T, formed only for heads V alone does not prove full rank
                projectors = HeadProjectors.build(
                    Vn.reshape(-1, n, Vn.shape[-1]), tol, factors.right[layer], factors.cond2[layer]
                )
                A = _workspace((n_heads, n, n), device, slot=0)
                for j, b in enumerate(members):
                    raw_ = raw[b][layer].copy_(attention[b, :, :n, :n])
                    heads = slice(j * n_heads, (j + 1) * n_heads)
                    source = raw_ if projectors.keeps_all(heads) else A.copy_(raw_)
                    projectors.apply(source, heads, eff[b][layer])
                ranks[members, layer] = projectors.rank.view(len(members), n_heads).cpu()

    def project_causal(
        layer: int, n: int, members: list[int], raw_block: Tensor, Vn: Tensor, dtype: torch.dtype
    ) -> None:
        """Per query prefix (see identifiability/causal.py), in place in the float64 copy of
        ``raw_block [g, H, n, n]`` (made here, on a worker when deferred: the forward pass only
        copies the attention); ``dtype``: that of the values the model computed (the default
        tolerance's)."""
        A = blocks[n][1][layer].copy_(raw_block)
        rtol_for = partial(_prefix_rtol, d=d, dtype=dtype, rtol=rtol)
        window = windows[layer]
        if window and n > window:  # each query's window of T, not its prefix
            # queries before the window's length see their whole prefix: the causal path
            lead = A[..., :window, :window].contiguous()
            _, lead_rank = prefix_effective_attention(
                lead,
                Vn[..., :window, :].contiguous(),
                rtol_for,
                right=factors.right[layer],
                right_smin=factors.smin[layer],
                out=lead,
            )
            A[..., :window, :window] = lead
            _, window_rank = window_effective_attention(
                A, Vn, rtol_for, window, right=factors.right[layer], out=A, first_query=window
            )
            window_rank[..., :window] = lead_rank
            null, rank = window_null_dims(window_rank, window)
            ranks[members, layer], nulls[members, layer] = rank.cpu(), null.cpu()
            return
        rank = prefix_effective_attention(
            A,
            Vn,
            rtol_for,
            right=factors.right[layer],
            right_smin=factors.smin[layer],
            out=A,
        )[1][..., -1]  # the last query's prefix is the whole sequence
        ranks[members, layer] = rank.cpu()

    def finish() -> list[SequenceAttention]:
        if deferred:
            _project_on_workers(deferred)
        empty = torch.empty(0, dtype=torch.float64)
        ids = token_ids.tolist()
        return [
            SequenceAttention(
                ids[b][:n],
                raw[b].cpu() if need_attention else empty,
                eff[b].cpu() if need_attention else empty,
                torch.where(nulls[b] >= 0, nulls[b], n - ranks[b]),
                ranks[b],
            )
            for b, n in enumerate(lengths)
        ]

    return EffectiveHooks(keep_values, process, finish)


def _project_on_workers(jobs: list[Callable[[], None]]) -> None:
    """Run ``jobs`` (causal layers' projections, independent of each other) on one worker
    thread per intra-op thread of the caller, each worker with one intra-op thread, taken in
    order (layer 0 first: the first layers cost the most on real models); raises the first
    job's error once all are done.

    Why after the forward pass and not beside it: the forward pass's GEMMs scale with their
    threads (SmolLM2 4 x 128: 1.36 s on one thread, 0.72 s on two), so sharing the cores with
    it saves nothing, and the sharing cost more than it saved (handing threads back and forth
    between the two): SmolLM2 4 x 128 effective attention best of 5, 1.27 s beside the forward
    pass, 1.10 s after it."""
    inference = torch.is_inference_mode_enabled()
    workers = _workers(torch.get_num_threads())
    futures = [workers.submit(_as_caller, job, inference) for job in jobs]
    errors = [future.exception() for future in futures]  # waits for every job
    for error in errors:
        if error is not None:
            raise error


# by process (a forked child has none of its parent's threads) and size; kept: their work
# buffers stay mapped
_WORKERS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _workers(count: int) -> ThreadPoolExecutor:
    """``count`` threads that process causal layers on the CPU (:func:`_project_on_workers`),
    each with one intra-op thread (:func:`_one_intra_op_thread`), all started here. With the default
    setting, a worker's own OpenMP team slowed every later forward pass of the caller by a
    quarter, even once idle (SmolLM2 4 x 128: 0.47 -> 0.61 s)."""
    key = (os.getpid(), count)
    if key not in _WORKERS:
        threads = torch.get_num_threads()  # this thread's own, taken before the workers set 1
        executor = ThreadPoolExecutor(
            max_workers=count,
            thread_name_prefix="tgeom-effective",
            initializer=_one_intra_op_thread,
        )
        started = threading.Barrier(count, timeout=60)
        for job in [executor.submit(started.wait) for _ in range(count)]:
            job.result()  # every thread has started, and run the initializer
        torch.set_num_threads(threads)  # again torch's default (see _one_intra_op_thread)
        _WORKERS[key] = executor
    return _WORKERS[key]


def _one_intra_op_thread() -> None:
    """One intra-op thread for the calling thread. The setting is per thread, but torch applies
    its latest value to a thread's first op as that thread's default, hence the call to
    ``get_num_threads`` first (this thread's first op) and, in :func:`_workers`, the caller
    taking its own value before (a caller whose first op came later got 1) and setting it
    again after (for threads started later)."""
    torch.get_num_threads()
    torch.set_num_threads(1)


def _as_caller(work: Callable[[], Any], inference: bool) -> Any:
    """``work()`` with autograd off and the caller's inference mode (both are per thread; the
    caller's tensors may be inference tensors, which only inference mode may change)."""
    with torch.inference_mode(inference), torch.no_grad():
        return work()


_WORKSPACES = threading.local()  # per thread: (shape, device, slot) -> a float64 buffer


def _workspace(shape: tuple[int, ...], device: torch.device, *, slot: int) -> Tensor:
    """A float64 work buffer of ``shape`` (``slot`` tells apart buffers used together), kept
    between calls: a batch after the first reuses memory that is already mapped, instead of
    paying first-touch page faults on fresh buffers every call. Never returned to callers."""
    cache: dict[tuple[Any, ...], Tensor] = getattr(_WORKSPACES, "cache", {})
    key = (shape, str(device), slot)
    if key not in cache:
        if len(cache) >= 8:  # a few length groups; forget the oldest
            del cache[next(iter(cache))]
        cache[key] = torch.empty(shape, dtype=torch.float64, device=device)
        _WORKSPACES.cache = cache
    return cache[key]


def token_type(token: str, token_id: int, lm: Any) -> str:
    """One of :data:`TOKEN_TYPES` for a token (special ids first, then punctuation)."""
    tok = lm.tokenizer
    if token_id in {tok.cls_token_id, tok.bos_token_id} - {None}:
        return "cls/bos"
    if token_id in {tok.sep_token_id, tok.eos_token_id} - {None}:
        return "sep/eos"
    core = token.strip().removeprefix("##").removeprefix("Ġ").removeprefix("▁")
    if core and all(
        c in string.punctuation or unicodedata.category(c).startswith("P") for c in core
    ):
        return "punctuation"
    return "other"


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two equally shaped tensors (NaN when one is constant)."""
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    xc, yc = x - x.mean(), y - y.mean()
    denominator = float(xc.norm() * yc.norm())
    return float(xc @ yc) / denominator if denominator > 0 else float("nan")


@dataclass
class PearsonTable:
    """Pearson(raw, effective) ``values [S, L, H]`` over each sequence's allowed (causal: lower
    triangle; sliding-window layers: each query's window) entries, with the sequence ``lengths
    [S]``. Indexing reads ``values``."""

    values: Tensor
    lengths: list[int]

    def __getitem__(self, index: Any) -> Tensor:
        return self.values[index]

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def nanmean(self) -> Tensor:
        return self.values.nanmean()

    def by_length(self) -> list[dict[str, Any]]:
        """Per distinct length: mean over sequences and heads, per block."""
        rows = []
        for n in sorted(set(self.lengths)):
            idx = [s for s, m in enumerate(self.lengths) if m == n]
            per_block = self.values[idx].nanmean(dim=(0, 2)) if idx else torch.empty(0)
            rows.append({"length": n, "n_sequences": len(idx), "by_block": per_block.tolist()})
        return rows


@dataclass
class EffectiveSummary:
    """What a corpus-wide effective-attention run keeps once the matrices are dropped:
    Pearson(raw, effective) per sequence, block and head (:class:`PearsonTable`), the
    token-type attention *sums* ``type_sums[name] [L, H, 4]`` over ``n_queries`` queries (names
    ``raw_signed``, ``raw_abs``, ``effective_signed``, ``effective_abs``; order
    :data:`TOKEN_TYPES`). Sums, so the summaries of disjoint sets of sequences add up."""

    pearson: PearsonTable
    type_sums: dict[str, Tensor]
    n_queries: int
    d_head: int
    causal: bool
    windows: tuple[int, ...] = ()  # per layer, keys a query sees (0: global; (): no windows)

    @property
    def lengths(self) -> list[int]:
        return self.pearson.lengths

    @property
    def token_type_attention(self) -> dict[str, Tensor]:
        """Mean over sequences and queries of the attention each query gives to each token type,
        ``[L, H, 4]`` (abs = summed ``|weight|``)."""
        return {k: v / max(self.n_queries, 1) for k, v in self.type_sums.items()}

    def to_json(self) -> dict[str, Any]:
        r = self.pearson.values
        types = self.token_type_attention
        L, H = r.shape[1:]
        return {
            "n_blocks": int(L),
            "d_head": self.d_head,
            "lengths": self.lengths,
            "attention_windows": list(self.windows or (0,) * L),
            "token_types": list(TOKEN_TYPES),
            "pearson": [
                {"block": block, "head": h, "by_sequence": r[:, block, h]}
                for block in range(L)
                for h in range(H)
            ],
            "pearson_by_block": [
                {"block": block, "mean": float(r[:, block].nanmean())} for block in range(L)
            ],
            "pearson_by_length": self.pearson.by_length(),
            "token_type_attention": {
                k: [
                    {
                        "block": block,
                        "head": h,
                        **dict(zip(TOKEN_TYPES, v[block, h].tolist(), strict=True)),
                    }
                    for block in range(L)
                    for h in range(H)
                ]
                for k, v in types.items()
            },
            "summary_note": "signed = mean summed weight per query; abs = mean summed |weight|",
        }

    def to_frame(self, table: str = "pearson") -> pd.DataFrame:
        """One table of :data:`SUMMARY_TABLES` as a DataFrame: ``pearson`` (one row per block
        and head, ``by_sequence`` a list cell), ``pearson_by_block``, ``pearson_by_length`` or
        ``token_type_attention.NAME`` (one row per block and head, a column per token type)."""
        return results_frame(self.to_json(), table, SUMMARY_TABLES)


@dataclass
class EffectiveAttentionResult:
    """Effective attention over a set of sequences, with its summaries.

    ``sequences[s].raw / .effective [L, H, n_s, n_s]``, ``.null_dim [L, H]``; ``tokens`` and
    ``types`` (one of :data:`TOKEN_TYPES`) per sequence and token."""

    sequences: list[SequenceAttention]
    tokens: list[list[str]]
    types: list[list[str]]
    d_head: int
    causal: bool
    windows: tuple[int, ...] = ()  # per layer, keys a query sees (0: global; (): no windows)

    @property
    def lengths(self) -> list[int]:
        return [len(s.token_ids) for s in self.sequences]

    @property
    def warnings(self) -> list[str]:
        """One line when no sequence is longer than ``d_head``, or when some sliding-window
        layers see no more than ``d_head`` keys (no null space is possible there:
        :func:`~tgeom.analyses.identifiability.sequences.null_space_warnings`), else ``[]``."""
        return null_space_warnings(self.lengths, self.d_head, self.windows)

    @cached_property
    def summary(self) -> EffectiveSummary:
        """Pearson per sequence (over each sequence's allowed entries: the lower triangle for
        causal heads, each query's window in sliding-window layers) and the token-type attention
        sums. One block at a time: the float64 copies and masked entries of one ``[H, n, n]``
        block, not of the whole ``[L, H, n, n]`` (1.1B Llama, 128 tokens: 4 MB, not 0.26 GiB)."""
        pearson, count = [], 0
        L, H = self.sequences[0].raw.shape[:2]
        windows = self.windows or (0,) * L
        sums = {k: torch.zeros(L, H, len(TOKEN_TYPES), dtype=torch.float64) for k in TYPE_SUMS}
        for seq, types in zip(self.sequences, self.types, strict=True):
            n = seq.raw.shape[-1]
            masks: dict[int, Tensor] = {}
            for window in set(windows):
                allowed = torch.ones(n, n, dtype=torch.bool)
                if window:
                    allowed = window_keys(n, window)
                elif self.causal:
                    allowed = allowed.tril()
                masks[window] = allowed
            r = torch.empty(L, H, dtype=torch.float64)
            onehot = torch.tensor(
                [[t == k for k in TOKEN_TYPES] for t in types], dtype=torch.float64
            )
            for layer in range(L):
                raw, effective = seq.raw[layer].double(), seq.effective[layer]  # [H, n, n]
                allowed = masks[windows[layer]]
                r[layer] = torch.vmap(pearson_t)(raw[..., allowed], effective[..., allowed])
                for name, matrix in (("raw", raw), ("effective", effective)):
                    sums[f"{name}_signed"][layer] += (matrix @ onehot).sum(-2)
                    sums[f"{name}_abs"][layer] += (matrix.abs() @ onehot).sum(-2)
            pearson.append(r)
            count += len(types)
        table = PearsonTable(torch.stack(pearson), self.lengths)
        return EffectiveSummary(table, sums, count, self.d_head, self.causal, self.windows)

    @property
    def pearson(self) -> PearsonTable:
        """Pearson(raw, effective) per sequence, block and head (see :class:`PearsonTable`)."""
        return self.summary.pearson

    @property
    def token_type_attention(self) -> dict[str, Tensor]:
        """See :attr:`EffectiveSummary.token_type_attention`."""
        return self.summary.token_type_attention

    def to_json(self, matrices_of: int | None = 0) -> dict[str, Any]:
        """Summaries, plus per-head raw/effective matrices of sequence ``matrices_of``."""
        data = self.summary.to_json()
        if matrices_of is not None:
            L, H = self.sequences[0].raw.shape[:2]
            seq = self.sequences[matrices_of]
            data["tokens"] = self.tokens[matrices_of]
            data["heads"] = [
                {
                    "block": block,
                    "head": h,
                    "raw": seq.raw[block, h],
                    "effective": seq.effective[block, h],
                    "null_dim": int(seq.null_dim[block, h]),
                }
                for block in range(L)
                for h in range(H)
            ]
        return data

    def to_frame(self, table: str = "pearson", matrices_of: int = 0) -> pd.DataFrame:
        """A table of :meth:`EffectiveSummary.to_frame`, or ``heads``: one row per block and
        head of sequence ``matrices_of`` with its raw and effective matrices as list cells."""
        payload = self.to_json(matrices_of if table == "heads" else None)
        return results_frame(payload, table, (*SUMMARY_TABLES, "heads"))


def pearson_t(x: Tensor, y: Tensor) -> Tensor:
    """Tensor form of :func:`pearson` for ``vmap`` (NaN when one side is constant)."""
    xc, yc = x - x.mean(), y - y.mean()
    return (xc @ yc) / (xc.norm() * yc.norm())


def effective_attention(
    lm: Any,
    token_ids: Tensor,
    attention_mask: Tensor | None = None,
    runtime: Runtime | None = None,
) -> EffectiveAttentionResult:
    """Raw vs effective attention for every sequence of ``token_ids [B, T]`` (batched)."""
    runtime = runtime or Runtime.auto()
    sequences: list[SequenceAttention] = []
    for start in range(0, token_ids.shape[0], runtime.batch_size):
        stop = start + runtime.batch_size
        mask = attention_mask[start:stop] if attention_mask is not None else None
        sequences += effective_attention_batch(lm, token_ids[start:stop], mask)
    return effective_result(lm, sequences)


def effective_result(lm: Any, sequences: list[SequenceAttention]) -> EffectiveAttentionResult:
    """``sequences`` of ``lm`` with their token strings and types, as a result."""
    tokens = [lm.token_strings(s.token_ids) for s in sequences]
    types = [
        [token_type(t, i, lm) for t, i in zip(toks, s.token_ids, strict=True)]
        for toks, s in zip(tokens, sequences, strict=True)
    ]
    return EffectiveAttentionResult(
        sequences,
        tokens,
        types,
        lm.summary.d_head,
        bool(lm.summary.is_causal),
        lm.summary.attention_windows,
    )
