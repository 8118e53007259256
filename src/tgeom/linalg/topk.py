"""Exact top-k entries of a low-rank product ``A @ B.T`` that is never materialised.

[DAR] section 3 reads each attention head's ``QK_h`` and ``OV_h`` interaction matrices, ``[V, V]``
products of two ``[V, d_head]`` factors, through their largest entries (SPEC section 3). With
V ~ 50k the dense matrix holds 2.5e9 entries; :func:`factored_topk` walks it in tiles of
``chunk_size`` rows x ``col_chunk_size`` columns instead, keeping a running top-k, so the extra
memory is bounded by one tile (16 MB of float32 bounds, 8 MB in bfloat16, plus 32 MB of
float64 values by default) whatever V is.

Exactness. The result is what dense materialisation followed by a full sort gives:

- each value is the dot product ``A[i] . B[j]`` accumulated in float64 (products of float32
  numbers are exact in float64) and rounded once to the compute dtype (float64 when both
  factors are float64, else float32: bfloat16 and float16 factors are rescored in float32 or
  better, never in their own dtype), so values match a dense float64 product to that rounding
  and the selected pairs are those of the dense float64 matrix except at ties closer than that;
- order is value (best first), ties broken by smaller row, then smaller column;
- masked rows and columns are removed *before* selection, so ``k' = min(k, allowed entries)``
  pairs always come back;
- ``largest=False`` returns the most negative entries (the top of ``(-A) @ B.T``).

Speed: screening with a proven upper bound. Rows and columns are visited in decreasing norm.
Once ``k`` pairs are held, each tile is first screened with the cheap product of
``[a M_p, ||a M_rest||, s ||a M||] / max ||a M||`` and ``[b N_p, ||b N_rest||, s ||b N||] /
max ||b N||`` (``M N^T = I``, ``p`` leading directions, ``s^2`` the rounding margin below): by
Cauchy-Schwarz on the trailing directions this is an upper bound of every entry, so only entries
whose bound reaches the current k-th value are evaluated exactly (a tile with more than 1/8 of
its entries left is evaluated densely). A tile whose whole Cauchy-Schwarz bound
``max ||a|| max ||b||`` is below the k-th value is skipped. Screening never changes the result;
``prune=False`` evaluates every entry exactly (the reference path).

The basis. Float32 / float64 screens use the *balanced* basis: with ``G_A = A^T A`` and
``G_B = B^T B`` and the SVD ``G_A^1/2 G_B^1/2 = W S Z^T``, ``M = G_A^-1/2 W S^1/2``,
``N = G_B^-1/2 Z S^1/2``, so direction ``k`` carries ~``s_k`` of both sides and the trailing
directions the least of the product; ``p`` is the fewest directions (at least 24, at most
``max(24, r/2)``) whose trailing ``s`` sum to at most 1.2 times ``||s||``, the typical entry's
size. Gemma-3-270m's QK-norm factors (r = 256, block 5 head 0; 128 random rows x 65,536
random columns against 289, a lower bound of the top-50 value): in the orthonormal eigenbasis
of the Gram matrices 128 directions leave 1.7e-6 of the bounds at or above it, 64 leave 47%; in
the balanced basis 80 leave 5.8e-6, 64 leave 8.5e-5, and 101 are chosen. Its error
(``M N^T - I`` and the float64 products, measured) enters the margin, scaled by ``||M|| ||N||``
(``||a|| ||b|| <= ||M|| ||N|| ||a M|| ||b N||``). bfloat16 / float16 screens use the orthonormal
eigenbasis of the factors' summed normalised Gram matrices (``M = N = U``).
Candidates are listed from the rows whose screen maximum reaches the cut (listing a whole tile
costs as much as its product).

Screening in a low precision (``screen_dtype``; bfloat16 / float16 weights screen in their own
dtype, ``p = 16``; float32 and float64 screen in the compute dtype, ``p`` as above). With
``u`` the screen dtype's unit roundoff and ``q`` the screening width (``p + 2``), a screening
product computed in that dtype, by any kernel in any summation order (accumulating in the dtype
itself or wider), is within ``delta ||SA|| ||SB||`` of the exact product of the unrounded
screening vectors, ``delta = (2u + u^2) + gamma_q (1 + u)^2``, ``gamma_q = q u / (1 - q u)``
(the inputs' rounding to the dtype, then Higham's bound of ``q`` products and sums). The margin
``s^2 = (delta + e) / (1 - delta - e)``, ``e`` the error of an exact value (float64 sum, one
rounding to the compute dtype), makes the computed screen at least the stored exact value of
every entry: ``SA . SB >= a.b + s^2 ||a|| ||b||`` and ``||SA|| ||SB|| = (1 + s^2) ||a|| ||b||``
(both scaled). Dividing by the largest norms keeps every screening number at most ~1 (no
float16 overflow); results below the dtype's normal range add at most ``2 (q + 1)`` times its
smallest subnormal spacing, taken off the cut. bfloat16 (``u = 2^-8``, ``q = 18``):
``delta ~ 0.084`` and the bound widens by ``s^2 ~ 0.092`` of ``||a|| ||b||``, so more candidates
reach the exact rescoring, which alone decides the result. Kernels that accumulate in float32
err far less (~``3u``); the bound does not count on it (on GPUs a split-K reduction may run in
bfloat16).

NaN policy: factors holding NaN or inf raise :class:`~tgeom.errors.TgeomError` naming the factor
and its first bad row, as does a product that could overflow the compute dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tgeom.errors import TgeomError
from tgeom.linalg.precision import LOW_PRECISION

TILE_ENTRIES = 2**22  # entries per tile by default (4096 columns x 1024 rows)
DEFAULT_COL_CHUNK = 4096
SCREEN_RANK = 24  # at least this many leading directions kept exactly in the screening bound
SCREEN_SLACK = 1.2  # the screen's typical Cauchy-Schwarz term, in RMS entries (_screen_width)
LOW_SCREEN_RANK = 16  # the leading directions of a bfloat16 / float16 screen (module docstring)
VERIFY_BATCH = 2**15  # candidate entries evaluated at once (64 MB of gathered float64 rows)


@dataclass(frozen=True)
class TopPairs:
    """The selected entries of ``A @ B.T``, best first: ``rows, cols [k'] int64``,
    ``values [k']`` (compute dtype, float32 by default), on the device of ``A``."""

    rows: Tensor
    cols: Tensor
    values: Tensor

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def factored_topk(
    A: Tensor,
    B: Tensor,
    k: int,
    *,
    largest: bool = True,
    row_mask: Tensor | None = None,
    col_mask: Tensor | None = None,
    chunk_size: int | None = None,
    col_chunk_size: int | None = None,
    prune: bool = True,
    screen_dtype: torch.dtype | None = None,
) -> TopPairs:
    """The ``k`` largest (or most negative) entries of ``A [R, r] @ B [C, r].T``.

    ``row_mask [R]`` / ``col_mask [C]`` (bool): entries outside them are never selected.
    ``chunk_size``: rows per tile (default ``TILE_ENTRIES // col_chunk_size``);
    ``col_chunk_size``: columns per tile (default 4096). ``prune=False`` evaluates every entry
    exactly (same result, slower: the reference path). ``screen_dtype``: the dtype the
    screening products run in (default: the factors' own when both are bfloat16 or float16,
    else the compute dtype); the result does not depend on it. Runs on ``A``'s device.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise TgeomError(f"k must be a positive integer, got {k!r}; pass k >= 1.")
    for name, size in (("chunk_size", chunk_size), ("col_chunk_size", col_chunk_size)):
        if size is not None and (not isinstance(size, int) or size <= 0):
            raise TgeomError(f"{name} must be a positive integer, got {size!r}.")
    if screen_dtype is None and A.dtype == B.dtype and A.dtype in LOW_PRECISION:
        screen_dtype = A.dtype
    if screen_dtype not in (None, *LOW_PRECISION, torch.float32, torch.float64):
        raise TgeomError(f"screen_dtype must be a floating dtype, got {screen_dtype}.")
    A, B = _check_factors(A, B)
    dtype, device = A.dtype, A.device
    screen_dtype = screen_dtype or dtype
    R, C = A.shape[0], B.shape[0]
    rows = _allowed(row_mask, R, "row_mask", device)
    cols = _allowed(col_mask, C, "col_mask", device)
    if rows.numel() == 0 or cols.numel() == 0:
        no = torch.zeros(0, dtype=torch.int64, device=device)
        return TopPairs(no, no.clone(), torch.zeros(0, dtype=dtype, device=device))
    if not largest:
        A = -A  # exact: the top of (-A) @ B.T are the most negative entries of A @ B.T
    row_norm, col_norm = A.double().norm(dim=1), B.double().norm(dim=1)
    _check_overflow(row_norm, col_norm, dtype)
    margin = 1.0 + 4 * (A.shape[1] + 8) * torch.finfo(dtype).eps
    screening = _Screen(A, B, row_norm, col_norm, screen_dtype) if prune else None

    # Visit rows and columns by decreasing norm, in blocks; inside a block, indices ascend so
    # that row-major order within a tile is (row, col) order (needed for the tie rule).
    rows = rows[torch.argsort(row_norm[rows], descending=True, stable=True)]
    cols = cols[torch.argsort(col_norm[cols], descending=True, stable=True)]
    cc = min(col_chunk_size or DEFAULT_COL_CHUNK, cols.numel())
    rc = chunk_size or max(1, TILE_ENTRIES // cc)
    col_blocks = [torch.sort(cols[s : s + cc]).values for s in range(0, cols.numel(), cc)]
    col_bound = [float(col_norm[b].max()) for b in col_blocks]
    SB_blocks = [screening.SB[b] for b in col_blocks] if screening else [None] * len(col_blocks)

    best = _Running(k, C, dtype, device)
    for start in range(0, rows.numel(), rc):
        rb = torch.sort(rows[start : start + rc]).values
        row_bound = float(row_norm[rb].max())
        if prune and best.full and row_bound * col_bound[0] * margin < best.threshold:
            break  # later row blocks have smaller norms: nothing left can enter
        SA_block = screening.SA[rb] if screening else None
        for cb, SB_block, bound in zip(col_blocks, SB_blocks, col_bound, strict=True):
            if prune and best.full and row_bound * bound * margin < best.threshold:
                break  # later column blocks have smaller norms
            if screening is None or SA_block is None or SB_block is None or not best.full:
                best.offer_tile(_exact_tile(A, B, rb, cb), rb, cb)
                continue
            pos = screening.candidates(
                SA_block, SB_block, best.threshold, limit=rb.numel() * cb.numel() // 8
            )
            if pos is None:  # more than 1/8 of the tile reaches the cut: evaluate it densely
                best.offer_tile(_exact_tile(A, B, rb, cb), rb, cb)
            elif pos.numel() > 0:
                ri, cj = rb[pos // cb.numel()], cb[pos % cb.numel()]
                best.offer_entries(_exact_entries(A, B, ri, cj), ri * C + cj)
    values, r_out, c_out = best.result()
    return TopPairs(r_out, c_out, values if largest else -values)


class _Screen:
    """Screening factors ``SA [R, q], SB [C, q]`` in ``dtype`` whose product, computed in
    ``dtype`` by any kernel, bounds every exact entry from above (module docstring, "Screening
    in a low precision"): the leading ``p`` coordinates in the basis (``a M``, ``b N``; module
    docstring, "The basis"), the norm of the rest, a margin ``s ||.||``, all divided by the
    largest row (column) norm (float64 arithmetic, rounded once to ``dtype``). ``width``: ``p``
    (``r`` when not rotated). ``row_norm``, ``col_norm``: unused (the norms are recomputed in the
    basis)."""

    def __init__(
        self, A: Tensor, B: Tensor, row_norm: Tensor, col_norm: Tensor, dtype: torch.dtype
    ) -> None:
        r = A.shape[1]
        low = dtype in LOW_PRECISION
        p = min(r, LOW_SCREEN_RANK if low else max(SCREEN_RANK, r // 2))
        basis = None if r <= p + 1 else _eigenbasis(A, B) if low else _balanced_basis(A, B)
        if basis is not None and not low:  # as few directions as the spectrum allows
            p = min(p, _screen_width(basis.spectrum))
        rotate = basis is not None and r > p + 1
        q = p + 2 if rotate else r + 1  # columns of the screening factors
        exact = _exact_error(r, A.dtype) + (basis.error if rotate and basis else 0.0)
        # errors relative to ||a|| ||b||, the margin to ||a M|| ||b N|| >= ||a|| ||b|| / stretch
        excess = _screen_error(q, dtype) + exact * (basis.stretch if rotate and basis else 1.0)
        s = math.sqrt(excess / (1 - excess))
        self.dtype, self.width = dtype, p if rotate else r
        self.scale = 1.0
        factors = []
        for F, side in ((A, 0), (B, 1)):
            F64 = F.double()
            parts = [F64]
            if rotate and basis is not None:
                FU = F64 @ (basis.M if side == 0 else basis.N)
                parts = [FU[:, :p], FU[:, p:].norm(dim=1, keepdim=True)]
            norms = torch.cat(parts, dim=1).norm(dim=1, keepdim=True)  # ||a M|| (= ||a||)
            top = float(norms.max()) if norms.numel() else 0.0
            top = top if top > 0 else 1.0
            self.scale *= top
            factors.append((torch.cat([*parts, s * norms], dim=1) / top).to(dtype))
        self.SA, self.SB = factors
        # Absolute error of results below the normal range (each of q products and sums)
        info = torch.finfo(dtype)
        self.underflow = 2 * (q + 1) * info.smallest_normal * info.eps

    def candidates(
        self, SA_block: Tensor, SB_block: Tensor, threshold: float, limit: int | None = None
    ) -> Tensor | None:
        """Flat positions in the tile ``SA_block @ SB_block.T`` whose bound reaches
        ``threshold`` (an entry value): a superset of the entries that can enter the top-k.
        None when more than ``limit`` do: they are counted, not listed (listing a whole tile
        of 4M entries would hold 0.2 GiB of int64 positions only to evaluate it densely)."""
        cut = torch.tensor(
            _round_down(threshold / self.scale - self.underflow, self.dtype),
            dtype=self.dtype,
            device=SA_block.device,
        )
        screen = SA_block @ SB_block.T
        # One read of the tile for its row maxima; only rows that reach the cut are listed
        # (comparing and listing the whole tile costs as much as its product).
        hot = (screen.amax(dim=1) >= cut).nonzero()[:, 0]
        if hot.numel() == 0:
            return hot
        reach = screen[hot] >= cut
        if limit is not None and int(reach.sum()) > limit:
            return None
        at = reach.nonzero()
        return hot[at[:, 0]] * screen.shape[1] + at[:, 1]


@dataclass(frozen=True)
class _Basis:
    """Screening coordinates ``a M``, ``b N`` (``M, N [r, r]`` float64, ``M N^T ~ I``), in
    decreasing order of ``spectrum [r]`` (each direction's share of the entries' size);
    ``error``: a bound of ``|(a M).(b N) - a.b|`` relative to ``||a|| ||b||`` (``M N^T - I`` and
    the float64 products); ``stretch``: at least ``||a|| ||b|| / (||a M|| ||b N||)``."""

    M: Tensor
    N: Tensor
    spectrum: Tensor
    error: float
    stretch: float


def _eigenbasis(A: Tensor, B: Tensor) -> _Basis:
    """The orthonormal eigenbasis ``U`` of the factors' summed normalised Gram matrices
    (``M = N = U``), leading directions first."""
    r = A.shape[1]
    gram = torch.zeros(r, r, dtype=torch.float64, device=A.device)
    for F in (A, B):
        F64 = F.double()
        energy = float(F64.pow(2).sum())
        if energy > 0:
            gram += F64.T @ F64 / energy
    w, U = torch.linalg.eigh(gram)
    return _basis(U.flip(-1), U.flip(-1), w.flip(-1).clamp_min(0))


def _balanced_basis(A: Tensor, B: Tensor) -> _Basis:
    """The basis that balances the two sides: with ``G_A = A^T A``, ``G_B = B^T B`` (each over
    its trace, plus a ``1e-9`` ridge) and the SVD ``G_A^1/2 G_B^1/2 = W S Z^T``,
    ``M = G_A^-1/2 W S^1/2`` and ``N = G_B^-1/2 Z S^1/2``. Then ``(a M).(b N) = a.b`` and both
    sides' coordinate ``k`` has mean square ~``s_k``: the trailing directions carry the least of
    the *product*, where an orthonormal basis ranks each side's energy alone (Gemma-3 QK-norm
    factors, r = 256: 80 directions bound as tightly as 128 of the eigenbasis). Falls back to
    :func:`_eigenbasis` when a factor is zero or the basis is ill-conditioned."""
    r = A.shape[1]
    eye = torch.eye(r, dtype=torch.float64, device=A.device)
    roots = []
    for F in (A, B):
        F64 = F.double()
        gram = F64.T @ F64
        trace = float(gram.trace())
        if not trace > 0:
            return _eigenbasis(A, B)
        w, Q = torch.linalg.eigh(gram / trace + 1e-9 * eye)
        roots.append((Q * w.sqrt() @ Q.T, Q * w.rsqrt() @ Q.T))
    (root_a, inv_a), (root_b, inv_b) = roots
    W, S, Zt = torch.linalg.svd(root_a @ root_b)
    basis = _basis(inv_a @ W * S.sqrt(), inv_b @ Zt.T * S.sqrt(), S)
    return basis if basis.error < 1e-6 and basis.stretch < 1e6 else _eigenbasis(A, B)


def _basis(M: Tensor, N: Tensor, spectrum: Tensor) -> _Basis:
    """A :class:`_Basis` with its error and stretch measured: ``||M N^T - I||_F`` plus
    ``3 gamma_r ||M||_F ||N||_F`` (the float64 products ``a M``, ``b N`` and their dot), doubled;
    the stretch ``||M||_2 ||N||_2`` (``a = (a M) N^T`` up to that error), with 0.1% slack."""
    r = M.shape[0]
    eye = torch.eye(r, dtype=torch.float64, device=M.device)
    frob = float(M.norm()) * float(N.norm())
    error = float((M @ N.T - eye).norm()) + 3 * _gamma(r + 2, _unit_roundoff(torch.float64)) * frob
    stretch = float(torch.linalg.matrix_norm(M, 2)) * float(torch.linalg.matrix_norm(N, 2))
    return _Basis(M, N, spectrum, 2 * error, 1.001 * max(stretch, 1.0))


def _screen_width(spectrum: Tensor) -> int:
    """The fewest leading directions (at least ``SCREEN_RANK``) whose trailing spectrum sums to
    at most ``SCREEN_SLACK`` times its root-sum-square: the Cauchy-Schwarz term of a typical
    entry is then at most that many RMS entries (the bound's looseness)."""
    tail = spectrum.flip(0).cumsum(0).flip(0)  # tail[p] = sum of spectrum[p:]
    rms = float(spectrum.pow(2).sum().sqrt())
    small = (tail <= SCREEN_SLACK * rms).nonzero()
    p = int(small[0, 0]) if small.numel() else spectrum.numel()
    return max(SCREEN_RANK, p)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def _gamma(n: int, u: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative bound of ``n`` roundings (used
    where ``n u`` is small: q <= 18 in bfloat16, q <= 2^20 in float32)."""
    return n * u / (1 - n * u)


def _screen_error(q: int, dtype: torch.dtype) -> float:
    """Relative error (of ``||SA|| ||SB||``) of a ``q``-term screening product in ``dtype``:
    its inputs rounded to ``dtype`` (``(1 + u)^2 - 1``) and the products and sums rounded in
    ``dtype`` in any order (``gamma_q``), whatever wider accumulator a kernel may use."""
    u = _unit_roundoff(dtype)
    return (2 * u + u * u) + _gamma(q, u) * (1 + u) ** 2


def _exact_error(r: int, dtype: torch.dtype) -> float:
    """Relative error (of ``||a|| ||b||``) of an exact value: ``r`` terms accumulated in
    float64, then rounded once to ``dtype``; doubled, with float64 slack for the rotation."""
    return 2 * (_gamma(r + 2, _unit_roundoff(torch.float64)) + _unit_roundoff(dtype)) + 64 * (
        r + 8
    ) * _unit_roundoff(torch.float64)


def _round_down(x: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` at most ``x``."""
    value = torch.tensor(x, dtype=torch.float64).to(dtype)
    if float(value) > x:
        value = torch.nextafter(value, torch.tensor(-math.inf, dtype=dtype))
    return float(value)


def _exact_tile(A: Tensor, B: Tensor, rb: Tensor, cb: Tensor) -> Tensor:
    """``A[rb] @ B[cb].T`` accumulated in float64, rounded to the input dtype."""
    return (A[rb].double() @ B[cb].double().T).to(A.dtype)


def _exact_entries(A: Tensor, B: Tensor, ri: Tensor, cj: Tensor) -> Tensor:
    """``A[ri[n]] . B[cj[n]]`` for every n, accumulated in float64, in bounded batches."""
    out = [
        (A[ri[s : s + VERIFY_BATCH]].double() * B[cj[s : s + VERIFY_BATCH]].double()).sum(dim=1)
        for s in range(0, ri.numel(), VERIFY_BATCH)
    ]
    return torch.cat(out).to(A.dtype)


class _Running:
    """A running top-k under the total order (value desc, row asc, col asc)."""

    def __init__(self, k: int, n_cols: int, dtype: torch.dtype, device: torch.device) -> None:
        self.k, self.n_cols = k, n_cols
        self.values = torch.zeros(0, dtype=dtype, device=device)
        self.lin = torch.zeros(0, dtype=torch.int64, device=device)  # row * n_cols + col

    @property
    def full(self) -> bool:
        return self.values.numel() >= self.k

    @property
    def threshold(self) -> float:
        return float(self.values[-1]) if self.full else float("-inf")

    def offer_entries(self, values: Tensor, lin: Tensor) -> None:
        """Merge scattered entries ``values [n]`` at linear indices ``lin [n]``."""
        keep = values >= self.threshold
        if bool(keep.any()):
            self._merge(values[keep], lin[keep])

    def offer_tile(self, scores: Tensor, row_ids: Tensor, col_ids: Tensor) -> None:
        """Merge the entries of one tile ``scores [nr, nc]`` (rows/cols ascending ids)."""
        flat = scores.reshape(-1)
        cap = 4 * self.k + 1024
        if self.full:
            keep = flat >= self.threshold
            n_keep = int(keep.sum())
            if n_keep == 0:
                return
            if n_keep <= cap:
                pos = keep.nonzero().squeeze(1)
            else:
                pos = self._tile_topk(flat, scores.shape[1])
        elif flat.numel() <= cap:
            pos = torch.arange(flat.numel(), device=flat.device)
        else:
            pos = self._tile_topk(flat, scores.shape[1])
        nc = scores.shape[1]
        lin = row_ids[pos // nc] * self.n_cols + col_ids[pos % nc]
        self._merge(flat[pos], lin)

    def _tile_topk(self, flat: Tensor, nc: int) -> Tensor:
        """Flat positions of the tile's own top-k under the total order (ties: row-major)."""
        kk = min(self.k, flat.numel())
        kth = torch.topk(flat, kk, sorted=False).values.min()
        above = (flat > kth).nonzero().squeeze(1)  # fewer than kk
        need = kk - above.numel()
        equal = flat == kth
        # The first `need` tied entries in row-major order: find the rows that hold them first,
        # so that no more than need + nc positions are ever listed.
        per_row = equal.view(-1, nc).sum(dim=1)
        last_row = int(torch.searchsorted(per_row.cumsum(0), need))
        ties = equal[: (last_row + 1) * nc].nonzero().squeeze(1)[:need]
        return torch.cat([above, ties])

    def _merge(self, values: Tensor, lin: Tensor) -> None:
        values = torch.cat([self.values, values])
        lin = torch.cat([self.lin, lin])
        by_index = torch.argsort(lin)
        by_value = torch.sort(values[by_index], descending=True, stable=True).indices
        order = by_index[by_value][: self.k]
        self.values, self.lin = values[order], lin[order]

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.values, self.lin // self.n_cols, self.lin % self.n_cols


def _check_factors(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(A, Tensor) or not isinstance(B, Tensor) or A.ndim != 2 or B.ndim != 2:
        raise TgeomError("factors must be 2-D tensors A [R, r] and B [C, r].")
    if A.shape[1] != B.shape[1]:
        raise TgeomError(
            f"factor widths differ: A is {tuple(A.shape)}, B is {tuple(B.shape)}; "
            "both need the same number of columns r."
        )
    dtype = torch.float64 if A.dtype == B.dtype == torch.float64 else torch.float32
    A = A.detach().to(dtype)
    B = B.detach().to(device=A.device, dtype=dtype)
    for name, factor in (("A", A), ("B", B)):
        bad = ~torch.isfinite(factor).all(dim=1)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise TgeomError(
                f"factor {name} contains NaN or inf (first in row {row}); "
                "the weights are corrupt: check them or load another checkpoint."
            )
    return A, B


def _allowed(mask: Tensor | None, size: int, name: str, device: torch.device) -> Tensor:
    """Ascending ids allowed by ``mask`` (all when None)."""
    if mask is None:
        return torch.arange(size, device=device)
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != (size,):
        raise TgeomError(f"{name} must be a bool tensor of shape [{size}].")
    return mask.to(device).nonzero().squeeze(1)


def _check_overflow(row_norm: Tensor, col_norm: Tensor, dtype: torch.dtype) -> None:
    bound = float(row_norm.max()) * float(col_norm.max()) if row_norm.numel() else 0.0
    if bound >= torch.finfo(dtype).max / 4:
        raise TgeomError(
            f"entries of A @ B.T may overflow {dtype} (norm bound {bound:.3g}); "
            "pass float64 factors or rescale them."
        )
