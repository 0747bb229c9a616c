"""[guard.crowdsec]: what the schema and `edgeward check` refuse, with clear messages at the
table's line; a good table loads with the bouncer's defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeward.config.loader import ConfigError, loads
from edgeward.guard.validate import config_problems

BASE = """\
[services.a]
listen = ["127.0.0.1:8443"]
to = "127.0.0.1:9443"

[guard.crowdsec]
"""


def problems(body: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        loads(BASE + body, "edge.toml", checks=(config_problems,))
    return [str(p) for p in ei.value.problems]


def test_good_table_and_defaults(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("abc\n")
    cfg = loads(BASE + f'lapi_url = "http://127.0.0.1:8080"\napi_key_file = "{key}"\n', checks=(config_problems,))
    cs = cfg.guard.crowdsec
    assert cs is not None
    assert cs.lapi_url == "http://127.0.0.1:8080/"  # a base URL, ends with "/"
    assert (cs.update_frequency, cs.max_backoff, cs.timeout) == (10.0, 60.0, 5.0)
    assert cs.machine_id is None and cs.alert_origin == "crowdsec"
    assert loads(BASE.replace("[guard.crowdsec]\n", "")).guard.crowdsec is None


@pytest.mark.parametrize(("body", "message"), [
    ('api_key = "k"\n', "lapi_url"),
    ('lapi_url = "ftp://x/"\napi_key = "k"\n', "is not an http:// or https:// URL"),
    ('lapi_url = "http://127.0.0.1:99999/"\napi_key = "k"\n', "invalid port"),
    ('lapi_url = "http://127.0.0.1:8080/"\n', "needs api_key or api_key_file"),
    ('lapi_url = "http://127.0.0.1:8080/"\napi_key = "k"\napi_key_file = "/k"\n', "not both"),
    ('lapi_url = "http://127.0.0.1:8080/"\napi_key = "  "\n', "api_key is empty"),
    ('lapi_url = "http://127.0.0.1:8080/"\napi_key = "k"\nmachine_id = "m"\n', "machine_id needs password"),
    ('lapi_url = "http://127.0.0.1:8080/"\napi_key = "k"\npassword = "p"\n', "password needs machine_id"),
    ('lapi_url = "http://127.0.0.1:8080/"\ncert_path = "/c"\n', "cert_path and key_path go together"),
    ('lapi_url = "http://127.0.0.1:8080/"\ncert_path = "/c"\nkey_path = "/k"\n', "needs an https://"),
    ('lapi_url = "http://127.0.0.1:8080/"\napi_key = "k"\nupdate_frequency = "0s"\n', "update_frequency"),
    ('lapi_url = "http://127.0.0.1:8080/"\napi_key = "k"\npull = "1s"\n', "pull"),
    ('lapi_url = "http://127.0.0.1:8080/"\napi_key_file = "/nonexistent/key"\n',
     "api_key_file: cannot read /nonexistent/key"),
])
def test_refused_with_a_clear_message(body: str, message: str) -> None:
    got = problems(body)
    assert any(message in p for p in got), got
    assert all(p.startswith("edge.toml:") for p in got), got


def test_empty_key_file_and_reserved_jail_name(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("\n")
    got = problems(f'lapi_url = "http://127.0.0.1:8080/"\napi_key_file = "{key}"\n')
    assert any("is empty" in p for p in got), got
    with pytest.raises(ConfigError) as ei:
        loads(BASE.replace("[guard.crowdsec]\n", "") + '[jails.crowdsec]\nsources = ["edge:proto"]\n',
              checks=(config_problems,))
    assert "reserved name" in str(ei.value)
