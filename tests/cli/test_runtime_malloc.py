"""The CLI's malloc setting: glibc accepts it; the console entry point applies it."""

from __future__ import annotations

import platform

import tgeom.cli as cli
from tgeom.runtime import retain_freed_memory


def test_retain_freed_memory_is_accepted_by_glibc():
    assert retain_freed_memory() is (platform.libc_ver()[0] == "glibc")


def test_console_entry_point_retains_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "retain_freed_memory", lambda: calls.append(True) or True)
    monkeypatch.setattr(cli, "app", lambda **_: None)
    cli.main()
    assert calls == [True]
