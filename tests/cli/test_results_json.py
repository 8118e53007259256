"""results.json is streamed (each tensor converted as the encoder reaches it) and stays the text
``json.dumps(to_jsonable(...), indent=1)`` gives."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import torch

from tgeom import __version__
from tgeom.results import read_results, to_jsonable, write_results


@dataclasses.dataclass
class _Part:
    values: torch.Tensor
    score: float


def test_streamed_results_json_is_the_plain_dump(tmp_path):
    nan, inf = float("nan"), float("inf")
    payload = {
        "matrix": torch.tensor([[1.0, nan], [2.5, -inf]]),
        "heads": [{"block": 0, "raw": torch.arange(6.0).reshape(2, 3)}],
        "mixed": (1, 2.0, nan),
        "array": np.arange(3),
        "part": _Part(torch.tensor([3.0]), nan),
        "scalar": np.float32(1.5),
        "empty": torch.empty(0),
        "zero_dim": torch.tensor(2.0),
    }
    path = write_results(tmp_path, "test", payload, ["a warning"])
    document = {"tgeom_version": __version__, "command": "test", "warnings": ["a warning"]}
    expected = json.dumps({**document, **to_jsonable(payload)}, indent=1, allow_nan=False)
    assert path.read_text(encoding="utf-8") == expected + "\n"
    back = read_results(tmp_path)
    assert back["matrix"] == [[1.0, None], [2.5, None]] and back["part"]["score"] is None
