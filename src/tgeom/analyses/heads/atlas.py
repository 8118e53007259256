"""The head atlas (SPEC section 7): one row per (layer, head), the three papers joined.

:func:`heads` runs, over one corpus:

1. the [SZ] geometry collection (:func:`~tgeom.analyses.geometry.collect_statistics`: mu, pos
   and ctx as running float64 sums), which the key-side split and the layer atlas read;
2. one forward pass per batch over the corpus windows (all of them, or an evenly spaced sample
   of ``pass_windows``; results say which) feeding at once the identifiability survey
   (``null_dim``, ``pearson_raw_effective``, ``first_token_raw``, ``first_token_effective``),
   the behaviour scores (``prev_token``, ``first_token``, ``entropy``) and the key-side
   variance split (``positional``, ``content``, ``scale``, ``cross``, ``alibi``):
   :mod:`tgeom.analyses.heads.corpus_pass`;
3. the induction batch (``induction``: R random tokens repeated twice);
4. from the weights alone: the exact top-5 QK and OV pairs of every head
   (:func:`~tgeom.analyses.embedding.head_atlas`, special tokens filtered) and the spectral
   scores ``ov_copying`` and ``qk_same_token``;

and reads each layer's topic and positional directions in tokens
(:mod:`tgeom.analyses.heads.layer_atlas`). Layers are blocks (0-based): ``layer`` b is the
block that reads hidden state b and writes b + 1.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from tgeom.analyses.embedding.filters import VocabularySubset
from tgeom.errors import TgeomError, check_index
from tgeom.results import atomic_write_text, prepare_out_dir, results_frame, to_jsonable

if TYPE_CHECKING:
    import pandas as pd

    from tgeom.analyses.embedding.atlas import HeadAtlas
    from tgeom.analyses.geometry.stats import GeometryStats
    from tgeom.runtime import Runtime

SPLIT = ("positional", "content", "scale", "cross")
SCORES = (
    "ov_copying",
    "qk_same_token",
    *SPLIT,
    "null_dim",
    "pearson_raw_effective",
    "first_token_raw",
    "first_token_effective",
    "prev_token",
    "induction",
    "first_token",
    "entropy",
)
TOP_PAIRS = ("top_qk", "top_ov")
DEFAULT_INDUCTION_LENGTH = 25


def columns_of(alibi: bool) -> tuple[str, ...]:
    """heads.csv's columns, in order (``alibi`` after the split's parts for ALiBi models)."""
    scores = list(SCORES)
    if alibi:
        scores.insert(scores.index("cross") + 1, "alibi")
    return ("layer", "head", *scores, *TOP_PAIRS)


@dataclass
class HeadsResult:
    """The head atlas: ``rows`` (one dict per head, keys :attr:`columns`), ``layer_atlas``
    (plain data, one entry per layer: see :func:`~tgeom.analyses.heads.layer_atlas.layer_atlas`),
    ``top_pairs`` (per head and circuit, the pairs with their values), ``meta`` (model, corpus,
    windows), ``options`` and ``warnings``."""

    rows: list[dict[str, Any]]
    columns: list[str]
    layer_atlas: list[dict[str, Any]]
    top_pairs: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def column(self, name: str) -> list[Any]:
        return [row[name] for row in self.rows]

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, head), the columns of heads.csv."""
        return results_frame({"rows": self.rows}, "rows", ("rows",))

    def scores(self) -> list[str]:
        """The numeric score columns (all but ``layer``, ``head`` and the top pairs)."""
        return [c for c in self.columns[2:] if c not in TOP_PAIRS]

    def top_heads(self, name: str, n: int = 3) -> list[dict[str, Any]]:
        """The ``n`` heads with the largest ``name`` (NaN left out): ``[{layer, head, value}]``."""
        scored = [r for r in self.rows if r[name] == r[name]]  # NaN != NaN
        best = sorted(scored, key=lambda r: -r[name])[:n]
        return [{"layer": r["layer"], "head": r["head"], "value": r[name]} for r in best]

    def correlations(self, method: str = "spearman") -> pd.DataFrame:
        """Correlation across heads between every two score columns (``spearman``, ``pearson``
        or ``kendall``; pairwise, NaN cells left out): a square DataFrame."""
        frame = self.to_frame()[self.scores()].astype(float)
        return frame.corr(method=method)  # type: ignore[arg-type]

    def to_csv(self, path: str | Path | None = None) -> str:
        """heads.csv's text (header, then one line per head; an empty cell where a score is
        NaN); written atomically to ``path`` when given."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(self.columns)
        for row in to_jsonable(self.rows):
            writer.writerow(["" if row[c] is None else row[c] for c in self.columns])
        text = buffer.getvalue()
        if path is not None:
            atomic_write_text(path, text)
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            **self.meta,
            "options": self.options,
            "columns": self.columns,
            "n_rows": len(self.rows),
            "rows": self.rows,
            "top_pairs": self.top_pairs,
            "layer_atlas": self.layer_atlas,
        }


def default_induction_length(n_ctx: int | None) -> int:
    """:data:`DEFAULT_INDUCTION_LENGTH`, or less where the context is shorter (two copies and
    up to two special tokens fit)."""
    if n_ctx is None:
        return DEFAULT_INDUCTION_LENGTH
    return max(2, min(DEFAULT_INDUCTION_LENGTH, (int(n_ctx) - 2) // 2))


def default_seq_len(lm: Any) -> int:
    """64 tokens, or ``d_head + 32`` when that is longer (a window must have more tokens than
    ``d_head`` for a head's attention to have a null space at all: SmolLM2's d_head is 64),
    within the model's context."""
    wanted = max(64, int(lm.summary.d_head) + 32)
    n_ctx = lm.summary.n_ctx
    return wanted if n_ctx is None else min(wanted, int(n_ctx))


def sample_rows(n: int, wanted: int | None) -> Tensor:
    """``wanted`` evenly spaced window indices of ``0..n-1`` (all when None or >= n)."""
    if wanted is None or wanted >= n:
        return torch.arange(n)
    if wanted < 2:
        raise TgeomError(f"--pass-windows must be at least 2, got {wanted}.")
    return torch.linspace(0, n - 1, wanted).round().long().unique()


def window_vocabulary(lm: Any, windows: Any, frequent: int | None) -> VocabularySubset:
    """The tokens top pairs and the layer atlas range over: special tokens dropped and, with
    ``frequent``, only the ``frequent`` most frequent tokens of the windows themselves."""
    from tgeom.analyses.embedding.filters import frequent_token_ids, special_ids, token_mask

    include = None if frequent is None else frequent_token_ids(windows, frequent)
    mask = token_mask(lm, include_ids=None if include is None else include.tolist())
    return VocabularySubset(
        mask=mask,
        size=int(mask.numel()),
        drop_special=True,
        n_special=len(special_ids(lm)),
        frequent=frequent,
        corpus=None if include is None else "the analysed windows",
        n_frequent=None if include is None else int(include.numel()),
    )


def pair_text(pairs: list[dict[str, Any]]) -> str:
    """Top pairs as one readable cell: ``'row'→'col'`` (tokens quoted, spaces and newlines
    visible), best first, joined by ``; ``."""
    return "; ".join(f"{p['row_token']!r}→{p['col_token']!r}" for p in pairs)


def check_reused_statistics(stats: GeometryStats, windows: Any) -> None:
    """One-line error unless ``stats`` were collected over exactly ``windows``, position 0
    dropped (what the head atlas' own collection would give)."""
    from tgeom.analyses.geometry.collect import windows_fingerprint

    meta = stats.meta
    if meta.get("windows_sha256") != windows_fingerprint(windows.token_ids):
        raise TgeomError("the statistics handed to heads() are of other windows; pass none.")
    if meta.get("options", {}).get("keep_first"):
        raise TgeomError("the statistics handed to heads() keep position 0; pass none.")


def check_reused_pairs(atlas: HeadAtlas, blocks: list[int], k: int) -> None:
    """One-line error unless ``atlas`` holds ``k`` QK and OV pairs of every head of ``blocks``."""
    missing = sorted(set(blocks) - set(atlas.blocks))
    if atlas.k < k or missing or not {"qk", "ov"} <= set(atlas.circuits):
        raise TgeomError(
            f"the top pairs handed to heads() hold {atlas.k} pairs of {atlas.circuits} for "
            f"blocks {atlas.blocks}; it needs {k} of qk and ov for blocks {blocks}: pass none."
        )


def _top_pairs(atlas: HeadAtlas, k: int) -> dict[tuple[int, int, str], list[dict[str, Any]]]:
    """The atlas' first ``k`` pairs of each (block, head, circuit), best first."""
    found: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for r in (r for r in atlas.rows if r.rank < k):
        found.setdefault((r.block, r.head, r.circuit), []).append(
            {
                "row": r.row,
                "col": r.col,
                "row_token": r.row_token,
                "col_token": r.col_token,
                "value": r.value,
            }
        )
    return found


class _Stages:
    """``with stage(name):`` times a stage into ``timings[name]`` (seconds) and, when
    ``verbose``, names it on stderr as it starts."""

    def __init__(self, timings: dict[str, float], verbose: bool) -> None:
        self.timings, self.verbose = timings, verbose

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.verbose:
            print(f"heads: {name}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)


def heads(
    model: Any,
    corpus: Any = "builtin",
    *,
    seq_len: int | None = None,
    max_windows_per_topic: int | None = 2,
    prepend_special: bool = True,
    pass_windows: int | None = None,
    induction_length: int | None = None,
    induction_sequences: int = 8,
    blocks: list[int] | None = None,
    k: int = 5,
    frequent: int | None = 2048,
    runtime: Runtime | None = None,
    shard: Any = None,
    checkpoint_path: str | Path | None = None,
    seed: int = 0,
    progress: bool = False,
    stats: GeometryStats | None = None,
    weights_atlas: HeadAtlas | None = None,
) -> HeadsResult:
    """The head atlas of ``model`` (an alias, folder, .gguf, hub id or a LoadedModel) over
    ``corpus`` (a source for :func:`tgeom.load_corpus`, a Corpus, or ready Windows).

    ``seq_len`` (default :func:`default_seq_len`), ``max_windows_per_topic``,
    ``prepend_special``: the windows (SPEC 2; with
    ``prepend_special`` each window starts with BOS/CLS, the "first token" of the identifiability
    and behaviour columns, and the geometry drops that position as it drops position 0).
    ``pass_windows``: the shared forward pass reads this many evenly spaced windows (all when
    None). ``induction_length`` R (default 25, less for short contexts) and
    ``induction_sequences``: the induction batch. ``blocks``: the layers reported (all when
    None). ``k``: top pairs per head and circuit, over the ``frequent`` most frequent tokens
    of the windows (None: the whole vocabulary), special tokens dropped; the spectral scores
    range over the same tokens. ``shard``: a
    torchrun job's rank (default: from the environment). ``checkpoint_path``: where the
    geometry statistics are saved (and resumed from).

    Work already done elsewhere (the report's other sections) is reused, not redone:
    ``stats``, the [SZ] statistics of these very windows (position 0 dropped), skips the
    collection; ``weights_atlas``, a weights atlas over the same tokens with at least ``k`` pairs
    per head and circuit of every chosen block, gives the top pairs (its first ``k``)."""
    from tgeom.analyses.embedding.atlas import head_atlas
    from tgeom.analyses.geometry.collect import collect_statistics
    from tgeom.analyses.heads.behaviour import induction_batch, induction_scores
    from tgeom.analyses.heads.corpus_pass import corpus_pass
    from tgeom.analyses.heads.layer_atlas import layer_atlas, reading_note
    from tgeom.analyses.heads.spectral import spectral_scores
    from tgeom.capture.distributed import shard_from_env
    from tgeom.corpus import Corpus, Windows, load_corpus, make_windows
    from tgeom.models import LoadedModel, load_model
    from tgeom.runtime import Runtime

    lm = model if isinstance(model, LoadedModel) else load_model(str(model))
    n_ctx, n_blocks = lm.summary.n_ctx, int(lm.summary.n_layers)
    R = default_induction_length(n_ctx) if induction_length is None else induction_length
    repeated = induction_batch(lm, R, induction_sequences, seed)  # refuses a bad R first
    chosen = list(range(n_blocks)) if blocks is None else sorted(set(blocks))
    for b in chosen:
        check_index("block", b, n_blocks)
    docs = None
    if isinstance(corpus, Windows):
        windows = corpus
    else:
        docs = corpus if isinstance(corpus, Corpus) else load_corpus(str(corpus))
        windows = make_windows(
            docs,
            lm.tokenizer,
            default_seq_len(lm) if seq_len is None else seq_len,
            prepend_special=prepend_special,
            max_windows_per_topic=max_windows_per_topic,
            max_context=n_ctx,
        )
    if len(windows) < 2:
        raise TgeomError(
            f"the corpus gave {len(windows)} window(s) of {windows.seq_len} tokens; the head "
            "atlas needs at least 2: pass more text, a smaller --seq-len or a larger "
            "--max-windows-per-topic."
        )
    rows_used = sample_rows(len(windows), pass_windows)
    vocabulary = window_vocabulary(lm, windows, frequent)
    runtime = runtime or Runtime.auto()
    shard = shard if shard is not None else shard_from_env()
    if checkpoint_path is not None and shard.is_main:  # only once the inputs are known good
        prepare_out_dir(checkpoint_path)
    warnings: list[str] = []
    topics = windows.counts_by_topic()
    if len(topics) < 2:
        warnings.append(
            f"the corpus has {len(topics)} topic ({', '.join(map(repr, topics))}): the layer "
            "atlas needs at least 2 to read topic directions, so it holds the positional "
            "directions only; pass a folder with a sub-folder per topic or builtin"
        )
    source = docs.source if docs is not None else None
    timings: dict[str, float] = {}
    stage = _Stages(timings, progress and shard.is_main)
    if stats is not None:
        check_reused_statistics(stats, windows)
    if weights_atlas is not None:
        check_reused_pairs(weights_atlas, chosen, k)
    with stage("geometry collection"):
        if stats is None:
            stats = collect_statistics(
                lm,
                windows,
                runtime,
                checkpoint_path=checkpoint_path,
                progress=progress and shard.is_main,
                corpus=source,
                shard=shard,
                second_moment=False,
            )
    with stage("attention pass (survey, behaviour, key-side split)"):
        scores = corpus_pass(lm, windows.token_ids[rows_used], stats, runtime, shard)
    warnings += scores.warnings
    columns = dict(scores.columns)
    cw = lm.weights()
    H = int(lm.summary.n_heads)
    with stage("spectral scores"):
        # The same tokens as the top pairs: special tokens dropped, the frequent ones when
        # asked (Gemma 3's QK-norm factors over all 262,144 tokens took ~190 s a block).
        spectral = spectral_scores(cw, mask=vocabulary.mask)
    columns |= {"ov_copying": spectral.ov_copying, "qk_same_token": spectral.qk_same_token}
    with stage("induction batch"):
        columns["induction"] = induction_scores(lm, repeated, runtime).scores()
    with stage("top pairs"):
        atlas = (
            weights_atlas
            if weights_atlas is not None
            else head_atlas(
                cw,
                k,
                vocab=lm.vocab_strings,
                blocks=chosen,
                row_mask=vocabulary.mask,
                col_mask=vocabulary.mask,
                quiet=not (progress and shard.is_main),
            )
        )
    pairs = _top_pairs(atlas, k)
    alibi = cw.alibi_slopes is not None
    names = columns_of(alibi)
    rows = []
    for b in chosen:
        for h in range(H):
            row: dict[str, Any] = {"layer": b, "head": h}
            for name in names[2 : -len(TOP_PAIRS)]:
                value = columns[name][b, h] if name in columns else torch.tensor(float("nan"))
                row[name] = float(value)
            row["top_qk"] = pair_text(pairs.get((b, h, "qk"), []))
            row["top_ov"] = pair_text(pairs.get((b, h, "ov"), []))
            rows.append(row)
    top_pairs = [
        {"layer": b, "head": h, "circuit": c, "pairs": found}
        for (b, h, c), found in sorted(pairs.items())
    ]
    with stage("layer atlas"):
        readings = layer_atlas(
            stats,
            cw,
            chosen,
            mask=vocabulary.mask,
            vocab=lm.vocab_strings,
            with_topics=len(topics) >= 2,
        )
    meta = {
        **lm.identity,
        "family": lm.family,
        "corpus": source,
        "seq_len": int(windows.seq_len),
        "n_windows": len(windows),
        "windows_by_topic": topics,
        "prepend_special": bool(getattr(windows, "prepend_special", False)),
        "windows_sha256": stats.meta.get("windows_sha256"),
        "corpus_pass": {
            "n_windows": int(rows_used.numel()),
            "of": len(windows),
            "sample": "all windows"
            if int(rows_used.numel()) == len(windows)
            else "evenly spaced windows",
            "world_size": shard.world_size,
        },
        "geometry": {
            "n_windows": len(windows),
            "positions_dropped": "position 0 (BOS/CLS with prepend_special)",
        },
        "induction": repeated.to_json(),
        "spectral": {
            "definition": "sum(Re lambda) / sum(|lambda|) over the circuit's eigenvalues",
            "vocabulary": f"the top pairs' tokens ({spectral.n_tokens}): see 'vocabulary'",
            "embedding_sides": spectral.sides,
            "qk_norm_note": spectral.qk_norm_note,
        },
        "vocabulary": vocabulary.to_json(),
        "layer_atlas_reading": reading_note(cw),
        "rope_note": atlas.rope_note,
        "qk_norm_note": atlas.qk_norm_note,
        "softcap_note": atlas.softcap_note,
        "top_pairs_embedding": atlas.embedding,
        "timings_s": timings,
    }
    options = {
        "seq_len": int(windows.seq_len),
        "max_windows_per_topic": max_windows_per_topic,
        "prepend_special": prepend_special,
        "pass_windows": pass_windows,
        "induction_length": R,
        "induction_sequences": induction_sequences,
        "blocks": chosen,
        "k": k,
        "frequent": frequent,
        "seed": seed,
        "first_token_mean": "over every query of every window (signed: effective attention "
        "can be negative)",
    }
    return HeadsResult(rows, list(names), readings, top_pairs, meta, options, warnings)
