"""Every command that takes a ``--text`` refuses an empty or whitespace-only text (issue 21).

MiniLM's tokenizer wraps any text, even an empty one, in ``[CLS] ... [SEP]``: before the check
lived in :meth:`LoadedModel.encode_text`, ``attention effective minilm --text ''`` analysed
``[CLS][SEP]`` alone and exited 0. The list of text commands is checked against the CLI itself,
so a new ``--text`` command cannot skip the test.
"""

from __future__ import annotations

import pytest
import typer
from test_bad_inputs import assert_clean_failure, run_main

from tgeom.cli import app
from tgeom.errors import TgeomError

TEXT_COMMANDS = [("attention", "effective"), ("identify", "attribution"), ("weights", "lens")]
EMPTY_TEXTS = ["", "   ", " \n\t "]


def _commands_with_option(group: object, option: str, path: tuple[str, ...] = ()) -> list:
    found = []
    for name, command in getattr(group, "commands", {}).items():
        if hasattr(command, "commands"):
            found += _commands_with_option(command, option, (*path, name))
        elif any(option in getattr(p, "opts", ()) for p in command.params):
            found.append((*path, name))
    return found


def test_the_text_commands_listed_are_every_command_with_a_text_option():
    found = _commands_with_option(typer.main.get_command(app), "--text")
    assert sorted(found) == sorted(TEXT_COMMANDS)


@pytest.mark.slow
@pytest.mark.parametrize("text", EMPTY_TEXTS, ids=["empty", "spaces", "whitespace"])
@pytest.mark.parametrize("command", TEXT_COMMANDS, ids=" ".join)
def test_empty_text_is_refused_by_every_text_command(command, text, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_main([*command, "minilm", "--text", text, "--out", str(out)], capsys)
    assert_clean_failure(code, err, "text is empty or only whitespace", out)


@pytest.mark.slow
def test_encode_text_refuses_what_gives_no_real_token(minilm):
    for text in EMPTY_TEXTS:
        with pytest.raises(TgeomError, match="empty or only whitespace"):
            minilm.encode_text(text)
    with pytest.raises(TgeomError, match="only special tokens"):
        minilm.encode_text("[SEP] [CLS]")
    ids = minilm.encode_text("The cat sat.")
    tokens = minilm.token_strings(ids)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "cat" in tokens


def test_encode_text_refuses_too_few_and_too_many_tokens(tiny_model):
    lm = tiny_model("gpt2")  # character-level tokenizer, no special tokens added
    assert lm.encode_text("ab").tolist() == [[ord("a") - 28, ord("b") - 28]]
    with pytest.raises(TgeomError, match="fewer than 2 tokens"):
        lm.encode_text("a", min_tokens=2)
    with pytest.raises(TgeomError, match="more than the model context"):
        lm.encode_text("x" * (lm.summary.n_ctx + 1))


def test_logit_lens_api_refuses_a_whitespace_text(tiny_model):
    from tgeom.analyses.embedding.lens import logit_lens

    with pytest.raises(TgeomError, match="empty or only whitespace"):
        logit_lens(tiny_model("gpt2"), " \n ")
