"""``tgeom geometry collect / measure / run`` on a tiny model: outputs, resume, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tgeom.cli import main

REQUIRED = [
    "hidden",
    "var_share_pos",
    "var_share_ctx",
    "var_share_resid",
    "pos_stable_rank",
    "pos_rank_gavish_donoho",
    "pos_rank_screenot",
    "pos_explained_sq_top2",
    "pos_explained_sq_top3",
    "pos_explained_sq_top10",
    "pos_explained_sv_screenot",
    "pos_relative_norm_fro",
    "pos_relative_norm_op",
    "pos_lowfreq_share",
    "ctx_within_cos_excl_self",
    "ctx_within_cos_incl_self",
    "ctx_between_cos",
    "ctx_ari",
    "ctx_silhouette",
    "incoherence_max",
    "incoherence_mean",
    "random_baseline_mean",
    "principal_angles_deg",
]


def _corpus(folder: Path) -> Path:
    texts = {
        "letters": "abcdefghij klmnop " * 12,
        "digits": "0123456789 " * 20,
        "marks": "!?.,;:-+*/ " * 20,
    }
    for topic, text in texts.items():
        (folder / topic).mkdir(parents=True)
        (folder / topic / "a.txt").write_text(text, encoding="utf-8")
        (folder / topic / "b.txt").write_text(text[::-1], encoding="utf-8")
    return folder


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    old = sys.argv
    sys.argv = ["tgeom", *argv]
    try:
        with pytest.raises(SystemExit) as exit_info:
            main()
    finally:
        sys.argv = old
    return int(exit_info.value.code or 0), capsys.readouterr().err


@pytest.fixture(scope="module")
def inputs(tiny_model_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("geometry-cli")
    return {
        "model": tiny_model_dir("gpt2"),
        "corpus": _corpus(root / "corpus"),
        "one_topic": _corpus(root / "one") / "digits" / "a.txt",
    }


def test_run_writes_required_keys_and_figures(
    inputs: dict[str, Path], tmp_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = run_main(
        [
            "geometry",
            "run",
            str(inputs["model"]),
            str(inputs["corpus"]),
            "--seq-len",
            "16",
            "--out",
            str(tmp_out),
            "--batch-size",
            "3",
            "--hidden",
            "1",
        ],
        capsys,
    )
    assert code == 0, err
    results = json.loads((tmp_out / "results.json").read_text())
    assert results["command"] == "geometry measure"
    assert [row["hidden"] for row in results["by_hidden"]] == [0, 1, 2]
    assert (results["n_blocks"], results["n_hidden"]) == (2, 3)
    for row in results["by_hidden"]:
        assert set(REQUIRED) <= set(row)
        shares = row["var_share_pos"] + row["var_share_ctx"] + row["var_share_resid"]
        assert shares == pytest.approx(1.0, abs=1e-9)
    for name in [
        "variance_shares.png",
        "spectra.png",
        "spiral_2d_hidden1.png",
        "gram_dct_hidden1.png",
        "context_map_hidden1.png",
        "pos_ctx_cos_hidden1.png",
    ]:
        assert (tmp_out / name).read_bytes()[:4] == b"\x89PNG"
    html = (tmp_out / "spiral_3d_hidden1.html").read_text()
    assert len(html) > 1_000_000  # plotly.js embedded: opens offline


def test_collect_then_measure_and_collect_again_resumes(
    inputs: dict[str, Path], tmp_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "geometry",
        "collect",
        str(inputs["model"]),
        str(inputs["corpus"]),
        "--seq-len",
        "16",
        "--out",
        str(tmp_out),
        "--max-windows-per-topic",
        "2",
    ]
    assert run_main(args, capsys)[0] == 0
    assert run_main(args, capsys)[0] == 0  # complete checkpoint: nothing to redo
    assert run_main(["geometry", "measure", str(tmp_out)], capsys)[0] == 0
    assert len(json.loads((tmp_out / "results.json").read_text())["by_hidden"]) == 3
    options = ["--ctx-map", "tsne", "--rank-threshold", "exact"]
    assert run_main(["geometry", "measure", str(tmp_out), *options], capsys)[0] == 0
    results = json.loads((tmp_out / "results.json").read_text())
    assert results["options"]["ctx_map"] == "tsne"
    assert results["options"]["rank_method"] == "exact"
    n_windows = results["n_windows"]
    assert all(len(row["ctx_map_2d"]) == n_windows for row in results["by_hidden"])


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("seq_len", "seq-len"),
        ("one_topic", "in 1 topic"),
        ("mismatch", "another --seq-len"),
        ("hidden", "hidden state 9 is out of range"),
        ("no_stats", "no geometry statistics"),
        ("ctx_map", "--ctx-map must be one of pca, tsne"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    inputs: dict[str, Path],
    tmp_out: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    message: str,
) -> None:
    model, corpus = str(inputs["model"]), str(inputs["corpus"])
    collect = ["geometry", "collect", model, corpus, "--out", str(tmp_out)]
    if case == "seq_len":
        argv = [*collect, "--seq-len", "1000"]
    elif case == "one_topic":
        argv = [
            "geometry",
            "run",
            model,
            str(inputs["one_topic"]),
            "--seq-len",
            "8",
            "--out",
            str(tmp_out),
        ]
    elif case == "mismatch":
        assert (
            run_main([*collect, "--seq-len", "16", "--max-windows-per-topic", "1"], capsys)[0] == 0
        )
        argv = [*collect, "--seq-len", "12", "--max-windows-per-topic", "1"]
    elif case == "hidden":
        assert (
            run_main([*collect, "--seq-len", "16", "--max-windows-per-topic", "2"], capsys)[0] == 0
        )
        argv = ["geometry", "measure", str(tmp_out), "--hidden", "9"]
    elif case == "ctx_map":
        argv = ["geometry", "run", model, corpus, "--seq-len", "8", "--out", str(tmp_out)]
        argv += ["--ctx-map", "umap"]
    else:
        argv = ["geometry", "measure", str(tmp_out)]
    code, err = run_main(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tgeom: error:") and message in lines[0], err
    if case == "ctx_map":  # refused before any forward pass: nothing written
        assert not tmp_out.exists()


def test_bad_seq_len_exits_2_as_a_subprocess(inputs: dict[str, Path], tmp_out: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tgeom",
            "geometry",
            "run",
            str(inputs["model"]),
            str(inputs["corpus"]),
            "--seq-len",
            "1000",
            "--out",
            str(tmp_out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not tmp_out.exists()


def test_run_on_one_topic_leaves_no_output(
    inputs: dict[str, Path], tmp_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "geometry",
        "run",
        str(inputs["model"]),
        str(inputs["one_topic"]),
        "--seq-len",
        "8",
        "--out",
        str(tmp_out),
    ]
    assert run_main(argv, capsys)[0] == 2
    assert not tmp_out.exists()


def test_qk_covers_every_block_in_one_call_and_keeps_earlier_blocks(
    tiny_model_dir: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`geometry qk` without --block reads the recorded corpus again and writes every block's
    key-side split (shares and cross sum to 1, each entry equal to qk_split of that block; the
    four-part picture as captioned figure data, never shares), its figures and the summary; a
    later call for some blocks keeps the others; a bad block list, another corpus or stats from
    another model exit 2 with one line."""
    from tgeom.analyses.geometry import GeometryStats
    from tgeom.analyses.geometry.attention import PARTS, four_part_picture
    from tgeom.analyses.geometry.qk import qk_split
    from tgeom.corpus import load_corpus, make_windows
    from tgeom.models import load_model

    corpus = tmp_path / "c"
    for topic in ("a", "b"):
        (corpus / topic).mkdir(parents=True)
        (corpus / topic / "x.txt").write_text(f"{topic} words and more words " * 40)
    out = tmp_path / "stats"
    model = str(tiny_model_dir("llama"))
    collect = ["geometry", "collect", model, str(corpus), "--seq-len", "16", "--out", str(out)]
    assert run_main(collect, capsys)[0] == 0
    assert run_main(["geometry", "qk", model, str(out)], capsys)[0] == 0
    results = json.loads((out / "qk" / "results.json").read_text())
    assert results["blocks"] == [0, 1] and [e["block"] for e in results["by_block"]] == [0, 1]
    second = results["key_side_split"]["second_pass"]
    assert second["sample"] == "every window" and second["windows"] == second["of"] > 1
    assert {"key_side_split.png", "four_part_picture.png"} <= set(results["figures"])
    assert "not shares" in results["figures"]["four_part_picture.png"]
    for name in results["figures"]:
        assert (out / "qk" / name).stat().st_size > 0
    stats, lm = GeometryStats.load(out), load_model(model, device="cpu")
    windows = make_windows(load_corpus(str(corpus)), lm.tokenizer, 16)
    reference = qk_split(lm, stats, windows.token_ids, [0, 1])
    for entry, ref in zip(results["by_block"], reference.by_block, strict=True):
        assert entry["mask"] == "causal (s <= t)" and entry["attention_window"] == 0
        assert entry["parts"] == ["positional", "content", "scale", "cross"]
        assert len(entry["heads"]) == len(ref["heads"]) == 4
        for row, want in zip(entry["heads"], ref["heads"], strict=True):
            assert sum(row[p] for p in entry["parts"]) == pytest.approx(1.0, abs=1e-9)
            for p in entry["parts"]:
                assert row[p] == pytest.approx(want[p], rel=1e-9, abs=1e-12)
        picture = entry["four_part_picture"]
        assert not any(k.startswith("share_") for h in picture["heads"] for k in h)
        drawn = four_part_picture(stats, lm.weights(), entry["block"])["heads"]
        for row, want in zip(picture["heads"], drawn, strict=True):
            for p in PARTS:
                assert row[f"rms_{p}"] == pytest.approx(want[f"rms_{p}"], rel=1e-12)
    # one block per call, in two calls: neither overwrites the other
    (out / "qk" / "results.json").unlink()
    assert run_main(["geometry", "qk", model, str(out), "--block", "1"], capsys)[0] == 0
    assert json.loads((out / "qk" / "results.json").read_text())["blocks"] == [1]
    assert run_main(["geometry", "qk", model, str(out), "--block", "0"], capsys)[0] == 0
    again = json.loads((out / "qk" / "results.json").read_text())
    assert again["by_block"] == results["by_block"]
    other_corpus = tmp_path / "other"
    (other_corpus / "z").mkdir(parents=True)
    (other_corpus / "z" / "y.txt").write_text("quite different text here " * 40)
    for argv, message in (
        (["--block", "0,5"], "block 5 is out of range"),
        (["--block", "one"], "--block must be comma-separated integers"),
        (["--corpus", str(other_corpus)], "does not give the windows"),
        (["--max-windows", "0"], "--max-windows must be at least 1"),
    ):
        code, err = run_main(["geometry", "qk", model, str(out), *argv], capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    other = str(tiny_model_dir("gpt2"))
    code, err = run_main(["geometry", "qk", other, str(out)], capsys)
    assert code == 2 and "another model" in err and len(err.strip().splitlines()) == 1


def test_measure_conventions_paper_records_its_headline_and_refuses_old_statistics(
    inputs: dict[str, Path], tmp_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    collect = ["geometry", "collect", str(inputs["model"]), str(inputs["corpus"])]
    collect += ["--seq-len", "24", "--out", str(tmp_out), "--max-windows-per-topic", "2"]
    assert run_main(collect, capsys)[0] == 0
    paper = ["geometry", "measure", str(tmp_out), "--conventions", "paper", "--screenot-k", "5"]
    code, _ = run_main(paper, capsys)
    assert code == 0
    results = json.loads((tmp_out / "results.json").read_text())
    assert results["conventions"] == results["options"]["conventions"] == "paper"
    assert results["options"]["screenot_k"] == 5
    assert results["headline"] == {
        "estimated_rank": "pos_rank_screenot",
        "explained_ratio": "pos_explained_sv_screenot",
        "relative_norm": "pos_relative_norm_op",
        "within_topic_cos": "ctx_within_cos_incl_self",
    }
    for row in results["by_hidden"]:
        assert isinstance(row["pos_rank_screenot"], int)
        assert row["pos_relative_norm_op"] > 0 and row["pos_relative_norm_fro"] > 0
    code, err = run_main(["geometry", "measure", str(tmp_out), "--conventions", "paper"], capsys)
    assert code == 2 and "ScreeNOT with k=20" in err and len(err.strip().splitlines()) == 1
    # statistics collected without the second moment (as by an older tgeom): a one-line error
    lean = tmp_out.parent / "lean"
    assert run_main([*collect[:-4], "--out", str(lean), "--no-second-moment"], capsys)[0] == 0
    assert run_main(["geometry", "measure", str(lean)], capsys)[0] == 0  # tgeom: op norm null
    row = json.loads((lean / "results.json").read_text())["by_hidden"][0]
    assert row["pos_relative_norm_op"] is None and row["pos_relative_norm_fro"] > 0
    code, err = run_main(["geometry", "measure", str(lean), *paper[3:]], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "re-run `tgeom geometry collect`" in lines[0], err
    code, err = run_main([*collect[:-4], "--out", str(lean)], capsys)  # resume: say so
    assert code == 2 and "--no-second-moment" in err and len(err.strip().splitlines()) == 1
