"""A small folder corpus with three topics of different character statistics."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> object:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_topic_corpus(folder: Path, n_chars: int = 200) -> Path:
    alphabets = {"letters": "abcdefghij ", "digits": "0123456789 ", "marks": "!?.,;:-+*/ "}
    rng = random.Random(0)
    for topic, alphabet in alphabets.items():
        (folder / topic).mkdir(parents=True)
        for doc in range(2):
            text = "".join(rng.choice(alphabet) for _ in range(n_chars))
            (folder / topic / f"doc{doc}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture
def topic_corpus(tmp_path: Path) -> Path:
    return write_topic_corpus(tmp_path / "corpus")
