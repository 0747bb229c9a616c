"""`edgeward import fail2ban`: a fail2ban tree (Debian's shipped jail.conf, jail.d/, a jail.local
with [DEFAULT] and %(...)s) → [jails.*] tables that edgeward loads as they are, with the same
numbers fail2ban itself reads (`fail2ban-client -d` dumps the jails it would start: the oracle)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edgeward.config.loader import loads
from edgeward.guard.fail2ban_jails import seconds
from edgeward.guard.validate import config_problems
from support import require

EDGEWARD = [sys.executable, "-m", "edgeward.cli"]
SHIPPED_PROSODY_FILTER = Path(__file__).resolve().parents[2] / "src/edgeward/guard/filters/prosody-auth.conf"


def fail2ban_dump(confdir: Path) -> dict[str, dict[str, object]]:
    """What fail2ban would set per jail: `fail2ban-client -c DIR -d` prints its commands."""
    out = subprocess.run([require("fail2ban-client"), "-c", str(confdir), "-d"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    jails: dict[str, dict[str, object]] = {}
    for line in out.splitlines():
        if not line.startswith("["):
            continue
        cmd = ast.literal_eval(line)
        if cmd[0] == "add":
            jails[cmd[1]] = {"logpath": []}
        elif cmd[0] == "set" and cmd[1] in jails:
            jail, key, *values = cmd[1:]
            if key == "addlogpath":
                jails[jail]["logpath"].append(values[0])  # type: ignore[attr-defined]
            elif key == "addignoreip":
                jails[jail]["ignoreip"] = values
            else:
                jails[jail][key] = values[0]
    return jails


def edgeward_import(path: Path) -> tuple[str, dict[str, dict[str, object]]]:
    r = subprocess.run([*EDGEWARD, "import", "fail2ban", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout, tomllib.loads(r.stdout)["jails"]


def loads_in_edgeward(jails_toml: str, tmp: Path) -> None:
    """The printed tables, pasted under a minimal config, pass `edgeward check` with the guard's checks
    (every filter found and compiled with its parameters)."""
    config = f'[edge]\nadmin = "127.0.0.1:9901"\nstate_dir = "{tmp}/state"\n\n' \
             '[services.web]\nlisten = ["127.0.0.1:8443"]\nto = "127.0.0.1:9"\n\n' + jails_toml
    loads(config, "imported.toml", checks=(config_problems,))


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of Debian's /etc/fail2ban with a site's own jail.local and jail.d/ files."""
    require("fail2ban-client")
    conf = tmp_path / "fail2ban"
    shutil.copytree("/etc/fail2ban", conf)
    shutil.copy(SHIPPED_PROSODY_FILTER, conf / "filter.d" / "prosody-auth.conf")
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in ("prosody.log", "prosody-muc.log", "nginx-error.log", "mail.log"):
        (logs / name).write_text("")
    (conf / "jail.local").write_text(f"""
[DEFAULT]
bantime = 1h
findtime = 15m
ignoreip = 127.0.0.1/8 ::1 192.168.1.0/24
bantime.increment = true
bantime.factor = 2
bantime.maxtime = 1w
action = %(action_mwl)s
destemail = admin@example.org
nginx_error_log = {logs}/nginx-error.log
postfix_log = {logs}/mail.log

[sshd]
mode = aggressive
maxretry = 3

[prosody-auth]
enabled = true
port = xmpp-client,xmpp-server
logpath = {logs}/prosody*.log

[nginx-http-auth]
enabled = true

[postfix]
enabled = true
mode = aggressive
bantime = 2d 12h
logpath = %(postfix_log)s tail
""")
    # fail2ban reads jail.d/*.conf before jail.local, and jail.d/*.local after it.
    (conf / "jail.d" / "10-site.conf").write_text("[sshd]\nmaxretry = 9\nfindtime = 20m\n")
    (conf / "jail.d" / "custom.local").write_text("[nginx-http-auth]\nmaxretry = 2\n")
    return conf


def test_the_jails_of_the_scenarios_carry_over_with_fail2bans_own_numbers(tree: Path, tmp_path: Path) -> None:
    text, jails = edgeward_import(tree / "jail.local")
    want = fail2ban_dump(tree)
    assert set(jails) == set(want) == {"sshd", "prosody-auth", "nginx-http-auth", "postfix"}
    for name, theirs in want.items():
        ours = jails[name]
        assert ours["maxretry"] == theirs["maxretry"], name
        assert seconds(str(ours["findtime"])) == seconds(str(theirs["findtime"])), name
        assert seconds(str(ours["bantime"])) == seconds(str(theirs["bantime"])), name
        assert ours["ignoreip"] == theirs["ignoreip"], name
        inc = ours["increment"]
        assert isinstance(inc, dict) and inc["enabled"] is theirs["bantime.increment"] is True
        assert inc["factor"] == float(str(theirs["bantime.factor"]))
        assert seconds(str(inc["maxtime"])) == seconds(str(theirs["bantime.maxtime"]))
        if theirs["logpath"]:  # fail2ban lists the files that exist (globs expanded)
            assert sorted(ours["logpath"]) == sorted(theirs["logpath"]), name  # type: ignore[type-var]
    assert jails["sshd"]["maxretry"] == 3 and jails["sshd"]["findtime"] == "20m"  # jail.local, then jail.d/*.conf
    assert jails["nginx-http-auth"]["maxretry"] == 2  # jail.d/*.local last
    assert jails["sshd"]["filter"] == "sshd[mode=aggressive]" and jails["postfix"]["filter"] == "postfix[mode=aggressive]"
    assert jails["postfix"]["bantime"] == "60h"
    assert jails["postfix"]["logpath"] == [str(tmp_path / "logs" / "mail.log")]  # "tail" is not a file
    # What does not carry over is said, not dropped.
    assert "action sendmail-whois-lines: not carried over" in text
    assert "port = xmpp-client,xmpp-server: an edgeward ban refuses the address on every listener" in text
    assert "edgeward follows listed files, not patterns; 2 file(s) match it today" in text
    loads_in_edgeward(text, tmp_path)


def test_debians_shipped_jail_conf_alone(tmp_path: Path) -> None:
    require("fail2ban-client")
    text, jails = edgeward_import(Path("/etc/fail2ban"))
    want = fail2ban_dump(Path("/etc/fail2ban"))
    assert set(jails) == set(want) == {"sshd"}  # jail.d/defaults-debian.conf enables it
    assert jails["sshd"]["filter"] == "sshd[mode=normal]" and jails["sshd"]["maxretry"] == want["sshd"]["maxretry"]
    assert "not enabled, not imported" in text
    loads_in_edgeward(text, tmp_path)


def test_a_missing_or_broken_tree_is_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run([*EDGEWARD, "import", "fail2ban", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode == 2 and "no such file or directory" in r.stderr
    (tmp_path / "jail.local").write_text("[sshd]\nenabled = true\nbantime = %(undefined)s\n")
    r = subprocess.run([*EDGEWARD, "import", "fail2ban", str(tmp_path / "jail.local")], capture_output=True, text=True)
    assert r.returncode == 2 and "jail [sshd]" in r.stderr and "undefined" in r.stderr, r.stderr
