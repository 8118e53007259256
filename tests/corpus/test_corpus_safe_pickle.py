"""The restricted unpickler admits plain data only and never runs what a pickle names."""

from __future__ import annotations

import os
import pickle
import zlib
from pathlib import Path

import numpy as np
import pytest

from tgeom.corpus.safe_pickle import safe_loads
from tgeom.errors import TgeomError


class RunsShell:
    """Unpickling this with plain pickle.loads would run a shell command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


class CallsEval:
    def __reduce__(self) -> tuple:
        return (eval, ("__import__('os').getcwd()",))


def refusal(data: bytes) -> str:
    with pytest.raises(TgeomError) as info:
        safe_loads(data, name="evil.pkl")
    message = str(info.value)
    assert "\n" not in message and message.startswith("evil.pkl: ")
    return message


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_malicious_pickle_is_refused_and_runs_nothing(protocol: int, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = pickle.dumps(RunsShell(f"touch {marker}"), protocol=protocol)
    message = refusal(data)
    assert "system" in message and "plain" in message
    refusal(zlib.compress(data))  # compressed the same way as the gensim file
    assert not marker.exists()


def test_eval_and_arbitrary_classes_are_refused() -> None:
    assert "eval" in refusal(pickle.dumps(CallsEval()))
    assert "OrderedDict" in refusal(pickle.dumps(__import__("collections").OrderedDict(a=1)))


def test_admitted_names_cannot_be_turned_on_real_classes(tmp_path: Path) -> None:
    # copyreg._reconstructor is admitted, but only over the record stand-in, never a real class.
    crafted = b"ccopy_reg\n_reconstructor\n(c__builtin__\ndict\nc__builtin__\ndict\n(dtR."
    assert "not a plain record" in refusal(crafted)
    # BUILD on an admitted class name may not modify it.
    build_on_marker = b"cnumpy\nndarray\n(dS'x'\nI1\nsb."
    refusal(build_on_marker)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_plain_data_round_trips(protocol: int) -> None:
    value = {
        "text": ["héllo", "wörld"],
        "n": (1, -2, 3.5, True, None, 2**70),
        b"raw": {1, 2},
        "nested": [{"a": [[]]}, frozenset({"x"})],
    }
    data = pickle.dumps(value, protocol=protocol)
    assert safe_loads(data) == value
    assert safe_loads(zlib.compress(data)) == value


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_numpy_arrays_become_the_same_nested_lists(protocol: int) -> None:
    arrays = [
        np.arange(12, dtype=np.int64).reshape(3, 4) - 5,
        np.asfortranarray(np.arange(6, dtype=">i4").reshape(2, 3)),
        np.array([0.5, -1.25], dtype=np.float32),
        np.array([b"ab", b"c"], dtype="S3"),
    ]
    for array in arrays:
        assert safe_loads(pickle.dumps(array, protocol=protocol)) == array.tolist()


def test_gensim_newsgroups_pickle_reads_as_plain_dict() -> None:
    from tgeom.corpus.builtin import NEWSGROUPS_FILE, gensim_test_data

    bunch = safe_loads((gensim_test_data() / NEWSGROUPS_FILE).read_bytes())
    assert type(bunch) is dict
    assert bunch["target_names"] == ["alt.atheism", "sci.space"]
    assert len(bunch["data"]) == len(bunch["target"]) == len(bunch["filenames"]) == 200
    assert sorted(set(bunch["target"])) == [0, 1]
    for text, target, filename in zip(
        bunch["data"], bunch["target"], bunch["filenames"], strict=True
    ):
        # The label agrees with the file's folder name, which the pickle stores separately.
        assert filename.decode().split("/")[-2] == bunch["target_names"][target]
        assert isinstance(text, str)


def test_admitted_callables_cannot_allocate_from_a_number() -> None:
    # bytes(10**12) would allocate a terabyte: the bytes stand-in takes bytes or lists only.
    assert "bytes()" in refusal(b"c__builtin__\nbytes\n(I1000000000000\ntR.")


def test_structured_arrays_are_refused() -> None:
    array = np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])
    assert "not plain data" in refusal(pickle.dumps(array, protocol=2))


def test_object_arrays_hold_only_what_the_unpickler_admits(tmp_path: Path) -> None:
    plain = np.array(["a", ("b", 1)], dtype=object)
    assert safe_loads(pickle.dumps(plain, protocol=2)) == ["a", ("b", 1)]
    marker = tmp_path / "pwned"
    evil = np.array([RunsShell(f"touch {marker}"), "x"], dtype=object)
    assert "system" in refusal(pickle.dumps(evil, protocol=2))
    assert not marker.exists()
