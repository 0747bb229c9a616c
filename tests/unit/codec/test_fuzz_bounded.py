"""A short run of every fuzz target, so `pytest` alone guards the no-escape rule."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_codecs.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fuzz_codecs", FUZZ)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fuzz_codecs", module)
    spec.loader.exec_module(module)
    return module


fuzz = _load()
VALUES = {
    "tls": "ClientHello",
    "proxy": "ProxyHeader",
    "http": "HTTPRequestHead",
    "xmpp": "XMPPHeader",
    "ssh": "SSHBanner",
    "handoff": "HandoffRecord",
    "sniff": "Sniffed",
}


@pytest.mark.parametrize("target", sorted(fuzz.TARGETS))
def test_target(target: str) -> None:
    stats = fuzz.run(target, 2000, seed=1)
    assert stats.iterations == 2000
    assert VALUES[target] in stats.outcomes  # the seeds are valid messages
    assert any(o.endswith("Error") or "Error:" in o for o in stats.outcomes)


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert fuzz.main(["--target", "ssh", "--iterations", "200", "--builtin"]) == 0
    assert "ssh: 200 inputs" in capsys.readouterr().out


def test_escape_is_reported() -> None:
    broken = fuzz.Target(lambda data: data[1000], lambda: [b"x"], 10)
    with pytest.raises(fuzz.Escaped, match="IndexError"):
        fuzz.check(broken, b"abc")
