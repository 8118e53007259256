"""The report's default sizes give results that mean what their names say (no warnings of
their own making), on the CPU and on the GPU."""

from __future__ import annotations

import pytest

from tgeom.analyses.identifiability.identify import MIN_TEST_SEQUENCES, min_sequences
from tgeom.report.build import ReportOptions


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_default_identification_split_has_enough_test_sequences(device: str) -> None:
    options = ReportOptions.for_device(device)
    assert options.identify_sequences >= min_sequences((0.7, 0.15, 0.15), MIN_TEST_SEQUENCES)
