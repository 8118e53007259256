"""Results on disk: ``results.json`` written atomically, with the identity of what produced it."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tgeom.errors import TgeomError

if TYPE_CHECKING:
    import pandas as pd


def tgeom_version() -> str:
    from tgeom import __version__

    return __version__


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, arrays, dataclasses and paths into plain JSON values (NaN -> None)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype | torch.device):
        return str(obj)
    return obj


def prepare_out_dir(out: str | Path) -> Path:
    """Create ``out`` (and parents) or raise a one-line error when it cannot be written."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TgeomError(
            f"cannot create output folder {path}: {exc.strerror}; pass a writable --out."
        ) from None
    if not os.access(path, os.W_OK):
        raise TgeomError(f"output folder {path} is not writable; pass a writable --out.")
    return path


@contextmanager
def atomic_replace(path: str | Path, *, folder: bool = False) -> Iterator[Path]:
    """A new temporary file (or, with ``folder``, folder) beside ``path`` to write into, renamed
    onto ``path`` when the block ends and removed if it raises: ``path`` is never half-written.

    What lands at ``path`` has the user's normal permissions, those a plain ``open`` or
    ``mkdir`` gives (0666 or 0777 less the umask): the temporary is created so, and the files
    written into it are given that mode before the rename. ``tempfile``'s private 0600/0700
    would survive the rename (``results.json`` was 0600 beside 0644 figures), and so would the
    0600 of the files ``safetensors`` writes (it replaces the file it is given by its own)."""
    path = Path(path)
    tmp = _new_beside(path, folder)
    normal = stat.S_IMODE(tmp.stat().st_mode) & 0o666  # 0666 less the umask
    try:
        yield tmp
        for written in tmp.rglob("*") if folder else [tmp]:
            if written.is_file() and not written.is_symlink():
                written.chmod(normal)
        os.replace(tmp, path)
    except BaseException:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _new_beside(path: Path, folder: bool) -> Path:
    """An empty hidden file or folder of a fresh random name in ``path``'s folder, made as
    ``open``/``mkdir`` make them (0666/0777 less the umask)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            if folder:
                tmp.mkdir(mode=0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half-written."""
    with atomic_replace(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_results(
    out: str | Path, command: str, payload: dict[str, Any], warnings: Sequence[str] = ()
) -> Path:
    """Write ``out/results.json``: ``payload`` plus the command, the tgeom version and
    ``warnings`` (always present, ``[]`` when none): one line per way the result cannot mean
    what its name says (an analysis result's ``warnings``, e.g. no null space is possible)."""
    out_dir = prepare_out_dir(out)
    document = {
        "tgeom_version": tgeom_version(),
        "command": command,
        "warnings": list(warnings),
        **_jsonable_but_arrays(payload),
    }
    target = out_dir / "results.json"
    # Streamed, each tensor or array converted as the encoder reaches it: the same text as
    # json.dumps(to_jsonable(...)), without holding every number as a Python float and the
    # whole text at once (attention effective on a 22-block, 32-head model, 128 tokens: 23 M
    # numbers, ~3.7 GiB that way).
    encoder = json.JSONEncoder(indent=1, allow_nan=False, default=to_jsonable)
    with atomic_replace(target) as tmp, tmp.open("w", encoding="utf-8") as handle:
        for chunk in encoder.iterencode(document):
            handle.write(chunk)
        handle.write("\n")
    return target


def _jsonable_but_arrays(obj: Any) -> Any:
    """:func:`to_jsonable`, leaving tensors and arrays for the encoder's ``default``."""
    if isinstance(obj, torch.Tensor | np.ndarray):
        return obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable_but_arrays(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): _jsonable_but_arrays(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable_but_arrays(v) for v in obj]
    return to_jsonable(obj)


def read_results(out: str | Path) -> dict[str, Any]:
    """Read ``out/results.json`` (``out`` may also be the file itself)."""
    path = Path(out)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise TgeomError(f"no results.json at {path}; run the command with --out first.")
    return json.loads(path.read_text(encoding="utf-8"))


def results_frame(
    payload: Any,
    table: str,
    tables: Sequence[str],
    *,
    explode: Sequence[str] = (),
) -> pd.DataFrame:
    """One table of a ``results.json`` payload as a tidy DataFrame, its columns the payload's names.

    ``payload``: what a result's ``to_json`` returns, or the result itself when ``results.json``
    holds it whole (converted here as ``write_results`` does, so cells equal the file's values,
    NaN as None). ``table`` (one of ``tables``) names a list
    of records: one row per record, the record's keys as columns in order. A dotted name walks
    in: ``"a.b"`` is key ``b`` of dict ``a``, or, when ``a`` is a list of records, one row per
    record of each one's list ``b``, led by that record's other fields. ``explode``: columns
    holding equal-length lists, spread to one element per row.
    """
    import pandas as pd

    if table not in tables:
        raise TgeomError(f"unknown table {table!r}; choose one of {', '.join(tables)}.")
    rows: Any = to_jsonable(payload)
    for key in table.split("."):
        if isinstance(rows, dict):
            rows = rows[key]
        else:  # a list of records: each record's own list, led by its other fields
            rows = [
                {**{k: v for k, v in parent.items() if k != key}, **child}
                for parent in rows
                for child in parent[key]
            ]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    frame = pd.DataFrame.from_records(rows, columns=columns)
    if explode:
        frame = frame.explode(list(explode), ignore_index=True).infer_objects()
    return frame


def per_block_frame(label: str, series: dict[str, Any]) -> pd.DataFrame:
    """A tidy DataFrame of per-block values stored by name and then by ``label`` in
    ``results.json`` (``series[name][g][b]``, e.g. R_k's ``overlap[group][block]``): one row per
    (``label`` value g, block b), columns ``label``, ``block`` and each name; cells as written to
    the file. 2-D values (``[block of A, block of B]``) give ``block_a`` and ``block_b`` instead."""
    import pandas as pd

    names = [name for name, values in series.items() if values is not None]
    plain = {name: to_jsonable(series[name]) for name in names}
    rows: list[dict[str, Any]] = []
    for g, first in plain[names[0]].items():
        if first and isinstance(first[0], list):
            for a, row in enumerate(first):
                for b in range(len(row)):
                    cells = {name: plain[name][g][a][b] for name in names}
                    rows.append({label: g, "block_a": a, "block_b": b, **cells})
        else:
            for b in range(len(first)):
                rows.append({label: g, "block": b, **{n: plain[n][g][b] for n in names}})
    return pd.DataFrame.from_records(rows)
