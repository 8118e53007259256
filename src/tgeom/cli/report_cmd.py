"""``tgeom report MODEL --corpus CORPUS --out DIR``: the whole atlas as one offline page."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from tgeom.cli import app
from tgeom.cli.options import DEVICE_MAP_OPT, DTYPE_OPT
from tgeom.runtime import DtypeName


@app.command("report")
def report(
    model: str = typer.Argument("smollm2", help="Alias, local folder, .gguf file or hub id."),
    corpus: str = typer.Option("builtin", "--corpus", help="Corpus source (default: built-in)."),
    out: Path = typer.Option(Path("report"), "--out", help="Folder for index.html and results."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Window length T in tokens."),
    windows_per_topic: int | None = typer.Option(
        None, "--windows-per-topic", help="Windows per topic for geometry and identifiability."
    ),
    force: bool = typer.Option(False, "--force", help="Write into a non-report folder anyway."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress display."),
    dtype: DtypeName = DTYPE_OPT,
    device_map: str | None = DEVICE_MAP_OPT,
) -> None:
    """Run the three analysis families and write a self-contained HTML report."""
    from tgeom.report.build import ReportOptions, build_report
    from tgeom.report.progress import Progress
    from tgeom.runtime import default_device

    overrides = {
        k: v
        for k, v in {
            "seq_len": seq_len,
            "windows_per_topic": windows_per_topic,
            "dtype": dtype,
            "device_map": device_map,
        }.items()
        if v is not None
    }
    options = ReportOptions.for_device(default_device().type, **overrides)
    start = time.perf_counter()
    index = build_report(
        model, corpus, out, options=options, force=force, progress=Progress(quiet=quiet)
    )
    if not quiet:
        typer.echo(f"report built in {time.perf_counter() - start:.1f} s")
    typer.echo(str(index))
