"""docs/config.md's reference of the guard's options is the schema's, word for word.

The schema (src/edgeward/config/schema.py) is the one description of every
option; the list between the ``guard-options`` markers in docs/config.md is
rendered from it here and must be equal.  After changing an option, rewrite
the list with ``EDGEWARD_WRITE_DOCS=1 pytest tests/unit/guard/test_docs.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from edgeward.config.loader import validate
from edgeward.config.schema import (
    BanIncrementSettings,
    Config,
    CrowdSecSettings,
    GuardSettings,
    JailSettings,
    NftSettings,
    ShareSettings,
)
from edgeward.config.units import parse_duration
from edgeward.guard.validate import config_problems

DOC = Path(__file__).resolve().parents[3] / "docs" / "config.md"
BEGIN = "<!-- guard-options: rendered from src/edgeward/config/schema.py by tests/unit/guard/test_docs.py -->"
END = "<!-- /guard-options -->"
TABLES: list[tuple[str, type[Any]]] = [
    ("[guard]", GuardSettings),
    ("[guard.nft]", NftSettings),
    ("[guard.share]", ShareSettings),
    ("[guard.crowdsec]", CrowdSecSettings),
    ("[jails.NAME]", JailSettings),
    ("[jails.NAME.increment]", BanIncrementSettings),
]


def _duration(seconds: float) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds and seconds % size == 0:
            return f'"{seconds / size:g}{unit}"'
    return f'"{seconds * 1000:g}ms"' if 0 < seconds < 1 else f"{seconds:g}"


def _is_duration(model: type[Any], name: str) -> bool:
    """The option is a Duration: its type carries the duration parser (units.Before), maybe within X | None."""
    hint = typing.get_type_hints(model, include_extras=True)[name]
    return any(getattr(m, "parse", None) is parse_duration
               for a in (hint, *typing.get_args(hint)) for m in getattr(a, "__metadata__", ()))


def _default(model: type[Any], info: dataclasses.Field[Any]) -> str:
    if info.default_factory is not dataclasses.MISSING:
        value: Any = info.default_factory()
    elif info.default is dataclasses.MISSING:
        return "required"
    else:
        value = info.default
    if dataclasses.is_dataclass(value):
        return "(table below)"
    if value is None:
        return "unset"
    if _is_duration(model, info.name) and isinstance(value, int | float) and value > 0:
        return _duration(float(value))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return json.dumps(value)


def render() -> str:
    out = [BEGIN]
    for title, model in TABLES:
        out += ["", f"`{title}`", ""]
        for info in dataclasses.fields(model):
            out.append(f"- `{info.name}` = `{_default(model, info)}`: {info.metadata['description']}")
    out += ["", END]
    return "\n".join(out)


def test_guard_options_in_docs_are_the_schema() -> None:
    text = DOC.read_text(encoding="utf-8")
    want = render()
    if os.environ.get("EDGEWARD_WRITE_DOCS") == "1":
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _m: want, text, flags=re.S)
        DOC.write_text(text, encoding="utf-8")
    start, end = text.find(BEGIN), text.find(END)
    assert start >= 0 and end > start, f"docs/config.md lacks the {BEGIN!r} ... {END!r} block"
    assert text[start:end + len(END)] == want, "run EDGEWARD_WRITE_DOCS=1 pytest " + __file__


def test_every_guard_option_is_described() -> None:
    for title, model in TABLES:
        for info in dataclasses.fields(model):
            description = info.metadata.get("description")
            assert description and description.strip(), f"{title} {info.name}"


def test_the_guard_example_in_docs_is_a_valid_config() -> None:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("## Guard (jails)"):]
    example = section[section.index("```toml") + len("```toml"):section.index("```\n", section.index("```toml") + 7)]
    cfg = validate(Config, tomllib.loads(example))
    assert set(cfg.jails) == {"sshd", "app", "garbage"} and cfg.guard.nft.enabled
    if not Path("/etc/fail2ban/filter.d/sshd.conf").is_file():
        pytest.skip("Debian's fail2ban filters are not installed")
    assert list(config_problems(cfg)) == []
