"""Scale and faults: torchrun-sharded collection equals one process; SIGKILL then resume equals
an uninterrupted run; a rank that dies stops the job with no result written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

STATS = "geometry_stats.safetensors"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TIMEOUT_S = 1200  # a whole job, on a machine whose cores are busy with other work


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scale-corpus")
    texts = {
        "sea": "waves roll over the grey sea while gulls cry above the boats. ",
        "code": "for item in items: total = total + item * 2 # accumulate. ",
        "math": "a prime number has exactly two divisors, one and itself. ",
    }
    for topic, text in texts.items():
        (root / topic).mkdir()
        for i in range(3):
            (root / topic / f"{i}.txt").write_text(text * (60 + 7 * i))
    return root


def collect_args(model: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        *("-m", "tgeom", "geometry", "collect", str(model), str(corpus)),
        *("--seq-len", "24", "--out", str(out), "--batch-size", "2", *extra),
    ]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(ranks: int, log_dir: Path) -> list[str]:
    """``torchrun`` for ``ranks`` gloo workers on this machine: the rendezvous store on a port the
    OS hands out (``--standalone``; two jobs at once never share one), and each rank's stdout and
    stderr in its own file under ``log_dir`` (see :func:`rank_logs`)."""
    return [
        *(TORCHRUN, "--standalone", "--nproc-per-node", str(ranks)),
        *("--log-dir", str(log_dir), "--redirects", "3"),
    ]


def rank_logs(log_dir: Path) -> str:
    """Every rank's own stderr, whole and labelled: a failing job shows why each rank stopped."""
    logs = sorted(log_dir.rglob("stderr.log"))
    return "\n".join(f"--- {p.relative_to(log_dir)} ---\n{p.read_text()}" for p in logs)


def run_tgeom(args: list[str], ranks: int = 1, log_dir: Path | None = None) -> None:
    """``python -m tgeom ARGS``, under ``torchrun`` with ``ranks`` gloo workers when > 1 (their
    logs in ``log_dir``); asserts success, showing torchrun's stderr and each rank's own."""
    launcher = [sys.executable]
    if ranks > 1:
        assert log_dir is not None
        launcher = torchrun(ranks, log_dir)
    done = subprocess.run(
        [*launcher, *args], capture_output=True, text=True, timeout=TIMEOUT_S, env=env()
    )
    ranks_said = rank_logs(log_dir) if log_dir is not None else ""
    assert done.returncode == 0, f"{done.stderr}\n{ranks_said}"


def single_process(model: Path, corpus: Path, out: Path) -> dict:
    run_tgeom(collect_args(model, corpus, out))
    return load_file(str(out / STATS))


def assert_same_stats(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        assert float((a[name] - b[name]).abs().max()) <= atol, name


def test_two_gloo_ranks_equal_one_process(tiny_model_dir, corpus, tmp_path):
    model = tiny_model_dir("gpt2")
    reference = single_process(model, corpus, tmp_path / "single")
    run_tgeom(collect_args(model, corpus, tmp_path / "sharded"), 2, tmp_path / "logs")
    sharded = load_file(str(tmp_path / "sharded" / STATS))
    assert_same_stats(sharded, reference, atol=1e-9)
    assert (tmp_path / "sharded" / "results.json").is_file()


def wait_for(path: Path, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout  # a polling deadline, not a timing assertion
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_then_resume_equals_uninterrupted(tiny_model_dir, corpus, tmp_path):
    model = tiny_model_dir("llama")
    reference = single_process(model, corpus, tmp_path / "whole")
    out = tmp_path / "killed"
    args = collect_args(model, corpus, out, "--checkpoint-every", "3")
    args[args.index("--batch-size") + 1] = "2"
    proc = subprocess.Popen([sys.executable, *args], env=env(), stderr=subprocess.DEVNULL)
    wait_for(out / STATS)  # the first checkpoint is on disk: kill mid-collection
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=TIMEOUT_S)
    from tgeom.analyses.geometry import GeometryStats

    partial = GeometryStats.load(out)  # a complete, loadable checkpoint (atomic writes)
    assert 0 < partial.n_done < partial.n_windows  # killed mid-collection
    run_tgeom(args)  # the resumed run
    assert_same_stats(load_file(str(out / STATS)), reference, atol=1e-12)


def test_a_dead_rank_stops_the_job_without_a_result(tiny_model_dir, corpus, tmp_path):
    model = tiny_model_dir("neox")
    out = tmp_path / "dead-rank"
    logs = tmp_path / "logs"
    args = collect_args(model, corpus, out, "--checkpoint-every", "1")
    args[args.index("--batch-size") + 1] = "1"
    proc = subprocess.Popen(
        [*torchrun(2, logs), *args],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    wait_for(out / f".{Path(STATS).stem}.rank1-of-2.safetensors")
    workers = subprocess.run(
        ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
    ).stdout.split()
    assert len(workers) == 2
    os.kill(int(max(workers, key=int)), signal.SIGKILL)  # the later-started worker
    _, stderr = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode != 0, rank_logs(logs)
    assert not (out / STATS).exists()  # no silent partial result
    assert not (out / "results.json").exists()
    assert "FAILED" in stderr or "failed" in stderr.lower()


def nullspace_args(model: Path, corpus: Path, out: Path) -> list[str]:
    return [
        *("-m", "tgeom", "attention", "nullspace", str(model), "--out", str(out)),
        *("--corpus", str(corpus), "--seq-len", "20", "--max-windows-per-topic", "3"),
        *("--batch-size", "2"),
    ]


def test_two_gloo_ranks_survey_null_spaces_like_one_process(tiny_model_dir, corpus, tmp_path):
    """The identifiability statistics over sequences (null dims, ranks, Pearson per sequence;
    token-type sums) sharded by batches: per-sequence numbers identical, sums to 1e-12."""
    import json

    model = tiny_model_dir("llama")  # causal: per-prefix null spaces
    run_tgeom(nullspace_args(model, corpus, tmp_path / "single"))
    run_tgeom(nullspace_args(model, corpus, tmp_path / "sharded"), 2, tmp_path / "logs")
    a = json.loads((tmp_path / "single" / "results.json").read_text())
    b = json.loads((tmp_path / "sharded" / "results.json").read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert len(a["null_space"]["lengths"]) == 9 and a["null_space"] == b["null_space"]
    assert a["effective"]["pearson"] == b["effective"]["pearson"]  # per sequence: bit for bit
    for name, rows in a["effective"]["token_type_attention"].items():
        for x, y in zip(rows, b["effective"]["token_type_attention"][name], strict=True):
            assert x.keys() == y.keys()
            assert all(abs(x[k] - y[k]) <= 1e-12 for k in x), (name, x, y)


def heads_args(model: Path, corpus: Path, out: Path) -> list[str]:
    return [
        *("-m", "tgeom", "heads", str(model), "--corpus", str(corpus), "--out", str(out)),
        *("--seq-len", "20", "--max-windows-per-topic", "3", "--batch-size", "2"),
        *("--frequent", "0", "--quiet"),
    ]


def test_two_gloo_ranks_give_the_head_atlas_of_one_process(tiny_model_dir, corpus, tmp_path):
    """tgeom heads sharded: geometry sums all-reduced (layer atlas to 1e-9), the attention
    pass by whole batches (null dims and Pearson per sequence bit for bit, so their means
    equal), behaviour and first-token sums all-reduced (1e-12)."""
    import json

    model = tiny_model_dir("llama")
    run_tgeom(heads_args(model, corpus, tmp_path / "single"))
    run_tgeom(heads_args(model, corpus, tmp_path / "sharded"), 2, tmp_path / "logs")
    a = json.loads((tmp_path / "single" / "results.json").read_text())
    b = json.loads((tmp_path / "sharded" / "results.json").read_text())
    assert (a["corpus_pass"]["world_size"], b["corpus_pass"]["world_size"]) == (1, 2)
    assert a["columns"] == b["columns"] and len(a["rows"]) == len(b["rows"]) == 2 * 4
    for x, y in zip(a["rows"], b["rows"], strict=True):
        assert (x["null_dim"], x["pearson_raw_effective"]) == (
            y["null_dim"],
            y["pearson_raw_effective"],
        )
        for name, value in x.items():
            if isinstance(value, float):
                assert abs(value - y[name]) <= 1e-12, (name, x, y)
            else:
                assert value == y[name], name
    for x, y in zip(a["layer_atlas"], b["layer_atlas"], strict=True):
        for tx, ty in zip(x["topics"], y["topics"], strict=True):
            assert [p["token_id"] for p in tx["promotes"]] == [
                p["token_id"] for p in ty["promotes"]
            ]
            assert abs(tx["norm"] - ty["norm"]) <= 1e-9
