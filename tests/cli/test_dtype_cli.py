"""``--dtype``: on every command that loads a model's weights, recorded in ``results.json``;
an unknown name exits 2 before anything loads; statistics collected in one dtype are not
resumed in another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import typer.main

from tgeom.cli import app

# Commands that take a model but have no --dtype, and why.
WITHOUT_DTYPE = {
    "corpus": "reads the tokenizer only, no weights",
    # Classifiers are trained and saved in float32 over a float32 base (classifier.json records
    # the base's source, not a precision); loading that base in another dtype would mix them.
    "weights finetune": "trains a float32 classifier",
    "weights stitch": "runs float32 classifiers",
    "weights diff": "diffs against a float32 classifier",
}
MODEL_PARAMS = {"model", "model_a", "pretrained"}


def commands(cmd: Any = None, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    cmd = typer.main.get_command(app) if cmd is None else cmd
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from commands(sub, (*path, name))
    else:
        yield " ".join(path), cmd


def run_tgeom(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, "-m", "tgeom", *args], capture_output=True, text=True, env=env, timeout=180
    )


def test_every_model_command_takes_dtype_float32_by_default():
    seen = []
    for name, cmd in commands():
        params = {p.name: p for p in cmd.params}
        if not MODEL_PARAMS & set(params) or name in WITHOUT_DTYPE:
            continue
        seen.append(name)
        assert "dtype" in params, f"{name} takes a model but no --dtype"
        assert params["dtype"].opts == ["--dtype"] and params["dtype"].default == "float32"
    assert {
        "info", "report", "heads", "geometry collect", "weights topk", "attention effective",
    } <= set(seen)  # fmt: skip


def test_unknown_dtype_exits_2_naming_the_choices(tiny_model_dir):
    proc = run_tgeom("info", str(tiny_model_dir("llama")), "--dtype", "int8")
    assert proc.returncode == 2
    assert "int8" in proc.stderr and "bfloat16" in proc.stderr and "float16" in proc.stderr


def test_dtype_is_recorded_beside_the_model(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    for dtype in ("bfloat16", None):
        out = tmp_path / str(dtype)
        flag = ["--dtype", dtype] if dtype else []
        proc = run_tgeom(
            "weights", "topk", model, "--block", "0", "--head", "1", "--circuit", "ov",
            "--k", "4", "--out", str(out), *flag,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        payload = json.loads((out / "results.json").read_text())
        assert payload["model"].endswith(tiny_model_dir("llama").name)
        assert payload["dtype"] == (dtype or "float32")
    proc = run_tgeom("info", model, "--dtype", "float16", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["dtype"] == "float16"


def test_statistics_are_not_resumed_in_another_dtype(tiny_model_dir, tmp_path):
    model, out = str(tiny_model_dir("llama")), tmp_path / "geo"
    common = ["geometry", "collect", model, "builtin", "--seq-len", "8"]
    common += ["--max-windows-per-topic", "2", "--out", str(out)]
    first = run_tgeom(*common, "--dtype", "bfloat16")
    assert first.returncode == 0, first.stderr
    assert json.loads((out / "results.json").read_text())["dtype"] == "bfloat16"
    again = run_tgeom(*common)  # float32 into the bfloat16 statistics
    assert again.returncode == 2
    assert "--dtype ('bfloat16', here 'float32')" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
