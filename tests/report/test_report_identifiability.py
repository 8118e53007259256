"""The report's identifiability section on a sliding-window model: its null-space record is read
with the model's windows (a window caps a generic head's null dimension at ``w - d_head``)."""

from __future__ import annotations

from pathlib import Path

import torch

from tgeom.report.build import ReportContext, ReportOptions
from tgeom.report.identifiability_section import identifiability_section
from tiny_models import save_tiny_model, windowed_mistral


class Quiet:
    """A progress display that shows nothing."""

    def stage(self, name: str):  # type: ignore[no-untyped-def]
        from contextlib import nullcontext

        return nullcontext()


def test_null_space_record_of_a_windowed_model_carries_its_windows(tmp_path: Path) -> None:
    """Tiny Mistral windowing both layers over 6 keys, d_head 2, sequences up to 12 tokens: the
    section's null-space record names the windows, and every head's share of generic null
    dimensions is computed against ``min(length, 6) - 2`` (random weights: all generic)."""
    model = save_tiny_model("mistral", tmp_path / "model", spec=windowed_mistral(6, head_dim=2))
    options = ReportOptions(
        seq_len=12,
        windows_per_topic=4,
        identify_sequences=12,
        null_seq_len=12,
        null_sequences=6,
        attribution_tokens=4,
    )
    (tmp_path / "out").mkdir()
    ctx = ReportContext(str(model), "builtin", options, tmp_path / "out", Quiet())
    section = identifiability_section(ctx)
    record = section.results["null_space"]
    assert record["attention_windows"] == [6, 6]
    lengths = torch.tensor(record["lengths"])
    assert int(lengths.max()) > 6  # some sequences are longer than the window
    generic = (lengths.clamp_max(6) - 2).clamp_min(0).tolist()
    for head in record["heads"]:
        assert head["null_dim"] == generic
        assert head["share_generic"] == 1.0
