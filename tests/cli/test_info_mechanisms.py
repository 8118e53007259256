"""``tgeom info --json`` names each model's special mechanisms (issue 18): position scheme, QK-norm,
sliding window per layer, soft-caps, parallel blocks."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tgeom.cli import app
from tiny_models import FAMILIES

runner = CliRunner()

EXPECTED = {  # what the tiny configs switch on (tests/tiny_models.py)
    "gpt2": ("learned", None, None, None, False),
    "neox": ("rotary", None, None, None, True),
    "olmo2": ("rotary", "all", None, None, False),
    "gemma": ("rotary", None, None, None, False),
    "gemma2": ("rotary", None, [4, None], {"attention": 2.0, "final": 3.0}, False),
    "gemma3_text": ("rotary", "head", [4, None], {"attention": None, "final": 3.0}, False),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_info_json_names_every_mechanism(tiny_model, tiny_model_dir, family):
    result = runner.invoke(app, ["info", str(tiny_model_dir(family)), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    mech = info["mechanisms"]
    assert list(mech) == [
        "position_scheme",
        "qk_norm",
        "sliding_window",
        "softcap",
        "parallel_block",
    ]
    s = tiny_model(family).summary
    assert mech["position_scheme"] == s.position_scheme in ("learned", "rotary", "alibi")
    assert mech["parallel_block"] == s.parallel_residual
    windows = mech["sliding_window"]
    if windows is None:
        assert not any(s.attention_windows)
    else:  # one entry per layer, null for a global layer
        assert len(windows) == s.n_layers and any(windows)
        assert [w or 0 for w in windows] == list(s.attention_windows)
    if family in EXPECTED:
        assert tuple(mech.values()) == EXPECTED[family]
