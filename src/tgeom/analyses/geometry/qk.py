"""``geometry qk``'s result: the key-side split per block and head, the four-part picture beside it.

SPEC section 4, "Attention". The numbers are the exact key-side variance split
(:mod:`.keyside`: ``positional``, ``content``, ``scale``, ``cross``, and ``alibi`` where the model
has ALiBi), from a second pass over the corpus (or an evenly spaced sample of it) after the
collection; the paper's four-part picture (:func:`.attention.four_part_picture`) is figure data
under ``four_part_picture``, its parts never reported as shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from tgeom.analyses.geometry.attention import four_part_picture, visible_pairs
from tgeom.analyses.geometry.keyside import KeySideSplit, key_side_split
from tgeom.analyses.geometry.stats import GeometryStats
from tgeom.errors import TgeomError

if TYPE_CHECKING:
    import pandas as pd

DEFINITION = (
    "Per query (c, t), over the keys s it sees (position 0 dropped unless the statistics keep "
    "it): each key's input h_s = mu + pos_s + ctx_c + resid[c, s], the norm made linear at "
    "the key (its own sigma or rms, its own QK-norm scale), RoPE at s, the model's real "
    "query; positional = Var_s(pos part) / Var_s(logit), content = Var_s(resid part) / "
    "Var_s(logit), scale = Var_s(mu + ctx + norm bias + b_K part) / Var_s(logit) (these are "
    "one vector per window: they vary over s only through the key's own norm scales and, with "
    "RoPE, its rotation at s), alibi = Var_s(slope (s - t)) / Var_s(logit), cross = 1 - the "
    "others (covariances; can be negative); averaged over queries weighted by their number "
    "of visible keys. Queries with fewer than 2 visible keys and rows with a constant logit "
    "are skipped (counted per head). The split is of the uncapped logits."
)


@dataclass
class QKResult:
    """The key-side split of the heads of ``blocks`` (``by_block``: one entry per block, its
    ``heads`` one row per head) and the four-part picture of each block (figure data)."""

    model: str
    n_blocks: int
    second_pass: dict[str, Any]
    by_block: list[dict[str, Any]]
    windows_sha256: str | None = None

    @property
    def blocks(self) -> list[int]:
        return [int(entry["block"]) for entry in self.by_block]

    @property
    def warnings(self) -> list[str]:
        """One line per block whose heads' shares cannot be read as a partition: parts that
        cancel (``cross < -1``: the parts vary more than the logit) or no usable query."""
        out = []
        for entry in self.by_block:
            heads = entry["heads"]
            cancel = [h["head"] for h in heads if h["cross"] is not None and h["cross"] < -1]
            empty = [h["head"] for h in heads if h["cross"] is None]
            if cancel:
                out.append(
                    f"block {entry['block']}: heads {cancel} have cross < -1: their parts vary "
                    "more than the logit and cancel, so their shares exceed 1 and do not "
                    "partition the logit's variance"
                )
            if empty:
                out.append(
                    f"block {entry['block']}: heads {empty} have no query with a varying logit "
                    "over 2 or more keys; their shares are null"
                )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "windows_sha256": self.windows_sha256,
            "n_blocks": self.n_blocks,
            "blocks": self.blocks,
            "key_side_split": {"definition": DEFINITION, "second_pass": self.second_pass},
            "by_block": self.by_block,
        }

    def to_frame(self, table: str = "heads") -> pd.DataFrame:
        """``heads``: one row per (block, head) with the split's shares and counts;
        ``four_part_picture``: one row per (block, head) with the picture's RMS (not shares)."""
        from tgeom.results import results_frame

        rows: dict[str, list[dict[str, Any]]] = {"heads": [], "four_part_picture": []}
        for entry in self.by_block:
            rows["heads"] += [{"block": entry["block"], **h} for h in entry["heads"]]
            rows["four_part_picture"] += entry["four_part_picture"]["heads"]
        return results_frame(rows, table, tuple(rows))


def block_entry(split: KeySideSplit, stats: GeometryStats, block: int, T: int) -> dict[str, Any]:
    """One block's entry of :class:`QKResult` from a fed split."""
    cw = split.cw
    shares = split.shares()[block]
    counts = split.counts()[block]
    lw = cw.layers[block]
    heads = []
    for h in range(split.n_heads):
        weight = float(counts["weight"][h])
        heads.append(
            {
                "block": block,
                "head": h,
                **{name: _number(shares[name][h]) for name in split.parts},
                "queries": int(counts["queries"][h]),
                "skipped_under_two_keys": int(counts["skipped_under_two_keys"][h]),
                "skipped_constant": int(counts["skipped_constant"][h]),
                "mean_logit_var": float(counts["logit_var"][h]) / weight if weight else None,
            }
        )
    picture = four_part_picture(stats, cw, block)
    picture_keys = ("caption", "parts", "norm_linearisation", "qk_norm", "heads")
    return {
        "block": block,
        "input_hidden": block,
        "mask": visible_pairs(cw, block, T)[1],
        "attention_window": picture["attention_window"],
        "rotary_applied": picture["rotary_applied"],
        "qk_norm": None if lw.q_norm is None else lw.q_norm.scope,
        "attn_logit_softcap": cw.summary.attn_logit_softcap,
        "parts": list(split.parts),
        "heads": heads,
        "four_part_picture": {k: picture[k] for k in picture_keys},
    }


def _number(value: Tensor) -> float | None:
    x = float(value)
    return None if x != x else x  # NaN: no usable query


def qk_split(
    lm: Any,
    stats: GeometryStats,
    token_ids: Tensor,
    blocks: list[int] | None = None,
    runtime: Any = None,
    *,
    max_windows: int | None = None,
) -> QKResult:
    """The key-side split of ``blocks`` (default: all) over ``token_ids [C, T]`` (the windows
    that collected ``stats``; ``max_windows``: an evenly spaced sample of them), with each
    block's four-part picture."""
    if not stats.complete:
        raise TgeomError(
            f"the statistics hold {stats.n_done} of {stats.n_windows} windows; run "
            "`tgeom geometry collect` again with the same arguments to finish them."
        )
    split, info = key_side_split(lm, token_ids, stats, blocks, runtime, max_windows=max_windows)
    T = int(token_ids.shape[1])
    return QKResult(
        model=str(lm.source),
        n_blocks=len(split.cw.layers),
        second_pass=info,
        by_block=[block_entry(split, stats, b, T) for b in split.blocks],
        windows_sha256=stats.meta.get("windows_sha256"),
    )
