"""Terminal summaries never cut a value (issue 21): run in a pipe at ``COLUMNS=40`` (a log or a
narrow terminal), every number printed equals the one in ``results.json`` at its printed
precision, nothing ends in an ellipsis, and a summary that leaves rows out says how many and
where they are. Real subprocesses: the width comes from the environment, as for a user."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def run_narrow(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "40", "LINES": "20", "TERM": "dumb"}
    done = subprocess.run(
        [sys.executable, "-m", "tgeom", *args], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "…" not in done.stdout + done.stderr
    return done.stdout


def table_rows(stdout: str) -> list[str]:
    """The lines under a table's dashed rule, up to the first blank or non-table line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if set(line) <= {"-", " "} and "-" in line)
    rows = []
    for line in lines[start + 1 :]:
        if not line.strip() or " more row" in line:
            break
        rows.append(line)
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("narrow-corpus")
    for topic, text in {"sea": "waves roll over the sea. ", "sky": "clouds drift high. "}.items():
        (root / topic).mkdir()
        (root / topic / "t.txt").write_text(text * 12)
    return root


def test_geometry_table_prints_every_number_whole(tiny_model_dir, corpus, tmp_path):
    out = tmp_path / "geo"
    model = str(tiny_model_dir("gpt2"))
    stdout = run_narrow("geometry", "run", model, str(corpus), "--seq-len", "8", "--out", str(out))
    rows = table_rows(stdout)
    lines = stdout.splitlines()
    header = re.split(r"\s{2,}", lines[lines.index(rows[0]) - 2].strip())
    layers = json.loads((out / "results.json").read_text())["by_hidden"]
    assert len(rows) == len(layers) == 3
    known = {
        "hidden": ("hidden", "{}"),
        "pos": ("var_share_pos", "{:.3f}"),
        "ctx": ("var_share_ctx", "{:.3f}"),
        "resid": ("var_share_resid", "{:.3f}"),
        "srank": ("pos_stable_rank", "{:.2f}"),
        "ARI": ("ctx_ari", "{:.2f}"),
        "between": ("ctx_between_cos", "{:.3f}"),
        "|cos| pos·ctx": ("incoherence_mean", "{:.3f}"),
        "random": ("random_baseline_mean", "{:.3f}"),
    }
    assert set(known) <= set(header)
    for line, layer in zip(rows, layers, strict=True):
        cells = line.split()
        assert len(cells) == len(header)
        for name, text in zip(header, cells, strict=True):
            float(text)  # every cell a whole number
            if name in known:
                key, fmt = known[name]
                assert text == fmt.format(layer[key]), name


def test_topk_says_how_many_pairs_are_left_out_and_where(tiny_model_dir, tmp_path):
    out = tmp_path / "topk"
    stdout = run_narrow(
        *("weights", "topk", str(tiny_model_dir("gpt2")), "--block", "1", "--head", "2"),
        *("--k", "25", "--out", str(out)),
    )
    pairs = json.loads((out / "results.json").read_text())["pairs"]
    rows = table_rows(stdout)
    assert len(pairs) == 25 and len(rows) == 20
    for i, (line, pair) in enumerate(zip(rows, pairs, strict=False)):
        rank, *_, value = line.split()  # tokens may be spaces: read the ends
        assert (int(rank), float(value)) == (i, float(f"{pair['value']:.4g}"))
        assert value == f"{pair['value']:.4g}"
    assert f"5 more rows in {out / 'results.json'}" in stdout.splitlines()


@pytest.mark.slow
def test_atlas_says_how_many_heads_are_left_out_and_where(tmp_path):
    """MiniLM's first two layers: 2 x 12 heads x 2 circuits = 48 top pairs, 20 shown."""
    out = tmp_path / "atlas"
    args = ("weights", "atlas", "minilm", "--blocks", "0,1", "--k", "1", "--quiet")
    stdout = run_narrow(*args, "--out", str(out))
    with (out / "atlas.csv").open() as handle:
        top = [r for r in csv.DictReader(handle) if r["rank"] == "0"]
    rows = table_rows(stdout)
    assert len(top) == 48 and len(rows) == 20
    for line, row in zip(rows, top, strict=False):
        block, head, circuit, *_, value = line.split()
        assert [block, head, circuit] == [row["block"], row["head"], row["circuit"]]
        assert value == f"{float(row['value']):.4g}"
    assert f"28 more rows in {out / 'atlas.csv'} (its rank-0 rows)" in stdout.splitlines()
