"""Migration from fail2ban: a jail.conf/jail.local tree → edgeward `[jails.*]` tables.

`edgeward import fail2ban /etc/fail2ban/jail.local` reads what fail2ban would read, in its
order (jail.conf with its [INCLUDES], jail.d/*.conf, jail.local, jail.d/*.local; fail2ban's
ConfigReader), with `[DEFAULT]` and `%(...)s` interpolation done by the same reader the
filters use (filter.py), and prints the enabled jails as TOML an edgeward config takes as it is.

What edgeward does differently is said in comments above each jail rather than dropped
silently: actions with no equivalent (mail, reporting), `port` (an edgeward ban covers every
listener unless `listeners` narrows it), log globs (edgeward follows listed files), `usedns`.
"""

from __future__ import annotations

import glob
import json
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from .filter import FilterError, Resolver, include_chain, read_ini

# fail2ban's time abbreviations (fail2ban.server.mytime.MyTime.str2seconds).
_TIME_UNITS = (
    (r"years?|yy?", 365 * 86400.0), (r"months?|mo", 30.4375 * 86400), (r"weeks?|ww?", 7 * 86400.0),
    (r"days?|dd?", 86400.0), (r"hours?|hh?", 3600.0), (r"minutes?|mm?|mins?", 60.0),
    (r"seconds?|ss?|secs?", 1.0),
)
_TIME_TOKEN = re.compile(r"([+-]?\d+(?:\.\d+)?)\s*(" + "|".join(u for u, _ in _TIME_UNITS) + r")?(?![a-z])", re.I)
# Ban actions whose work edgeward's own ban does (refused at the edge; nft set with [guard.nft]).
_BAN_ACTIONS = ("iptables", "ip6tables", "nftables", "firewallcmd", "ufw", "shorewall", "route", "hostsdeny",
                "pf", "ipfw", "npf", "nginx-block-map", "bsd-ipfw", "apf", "csf")
_NOT_JAILS = {"DEFAULT", "INCLUDES"}


class JailImportError(ValueError):
    """The fail2ban configuration cannot be read (the message says which file and why)."""


def seconds(text: str) -> float:
    """fail2ban's time strings: "600", "10m", "1h 30m", "1w", "-1" (forever)."""
    t = text.strip().lower()
    try:
        return float(t)
    except ValueError:
        pass
    total, pos = 0.0, 0
    for m in _TIME_TOKEN.finditer(t):
        if t[pos:m.start()].strip():
            break
        unit = m.group(2) or "s"
        factor = next(f for pattern, f in _TIME_UNITS if re.fullmatch(pattern, unit))
        total += float(m.group(1)) * factor
        pos = m.end()
    if pos == 0 or t[pos:].strip():
        raise ValueError(f"not a fail2ban time: {text!r}")
    return total


def duration(secs: float) -> str | int:
    """Seconds as edgeward writes them: -1 for forever, else the largest whole unit."""
    if secs < 0:
        return -1
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size and secs % size == 0:
            return f"{int(secs // size)}{unit}"
    return f"{math.ceil(secs)}s" if secs != int(secs) else f"{int(secs)}s"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("true", "yes", "1", "on", "enabled")


def _lines(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").splitlines() if v.strip()]


@dataclass
class Jail:
    """One enabled fail2ban jail as edgeward settings, with what did not carry over."""

    name: str
    settings: dict[str, object] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Imported:
    files: list[str]
    jails: list[Jail]
    disabled: list[str]


def read_files(target: str) -> list[str]:
    """The files fail2ban reads for its jails, in order, given jail.conf, jail.local or their directory."""
    base = Path(target)
    if not base.exists():
        raise JailImportError(f"{target}: no such file or directory")
    folder = base if base.is_dir() else base.parent
    d = folder / "jail.d"
    ordered = [folder / "jail.conf", *sorted(d.glob("*.conf")), folder / "jail.local", *sorted(d.glob("*.local"))]
    present = [str(p) for p in ordered if p.is_file()]
    if not present:
        raise JailImportError(f"{folder}: no jail.conf, jail.local or jail.d/ files there")
    # include_chain puts a file's .local overlay right after it; fail2ban reads jail.local and
    # jail.d/*.local after every .conf (the order above), so those overlays are skipped there.
    overlays = {str(p) for p in ordered if p.suffix == ".local"}
    order: list[str] = []
    for path in present:
        for p in include_chain(path):
            if (p in overlays and p != path) or p in order:
                continue
            order.append(p)
    return order


def import_jails(target: str) -> Imported:
    """Read fail2ban's jail configuration at `target`; every enabled jail as edgeward settings."""
    try:
        files = read_files(target)
        conf = read_ini(files)
    except FilterError as e:
        raise JailImportError(str(e)) from None
    resolve = Resolver(conf, {})
    jails: list[Jail] = []
    disabled: list[str] = []
    for section in conf.sections:
        if section in _NOT_JAILS or section.startswith("KNOWN/"):
            continue
        try:
            if not _truthy(resolve.get(section, "enabled")):
                disabled.append(section)
                continue
            jails.append(_jail(section, resolve))
        except (FilterError, ValueError) as e:
            raise JailImportError(f"jail [{section}]: {e}") from None
    return Imported(files, jails, disabled)


def _jail(name: str, r: Resolver) -> Jail:
    j = Jail(name)
    s = j.settings

    def get(option: str) -> str | None:
        return r.get(name, option)

    backend = (get("backend") or "auto").strip()
    if backend.startswith("systemd"):
        s["sources"] = ["journal"]
        if get("journalmatch"):
            s["journalmatch"] = _lines(get("journalmatch"))
    else:
        paths: list[str] = []
        for pattern in (p for line in _lines(get("logpath")) for p in line.split()):
            if pattern in ("tail", "head"):
                continue  # fail2ban's "path tail|head": where to start reading, not a file
            found = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
            if glob.has_magic(pattern):
                j.notes.append(f"logpath {pattern}: edgeward follows listed files, not patterns; "
                               f"{len(found)} file(s) match it today" + ("" if found else ": listed as written"))
            paths.extend(found or [pattern])
        s["logpath"] = paths
    flt = (get("filter") or name).strip()
    s["filter"] = flt
    for option in ("maxretry", "maxlines"):
        v = get(option)
        if v is not None and v.strip():
            s[option] = int(v)
    for option in ("findtime", "bantime"):
        v = get(option)
        if v is not None and v.strip():
            s[option] = duration(seconds(v))
    ignore = [a for a in re.split(r"[\s,]+", get("ignoreip") or "") if a]
    if ignore:
        s["ignoreip"] = ignore
    for option in ("datepattern", "logtimezone"):
        v = get(option)
        if v is not None and v.strip():
            s[option] = v.strip()
    if _truthy(get("bantime.increment")):
        inc: dict[str, object] = {"enabled": True}
        for option, key in (("bantime.factor", "factor"), ("bantime.formula", "formula"),
                            ("bantime.multipliers", "multipliers"), ("bantime.maxtime", "maxtime"),
                            ("bantime.rndtime", "rndtime"), ("bantime.overalljails", "overalljails")):
            v = get(option)
            if v is None or not v.strip():
                continue
            if key == "factor":
                inc[key] = float(v)
            elif key == "multipliers":
                inc[key] = [float(x) for x in v.split()]
            elif key in ("maxtime", "rndtime"):
                inc[key] = duration(seconds(v))
            elif key == "overalljails":
                inc[key] = _truthy(v)
            else:
                inc[key] = v.strip()
        s["increment"] = inc
    _note_actions(j, get("action"))
    port = (get("port") or "").strip()
    if port and port != "0:65535":
        j.notes.append(f"port = {port}: an edgeward ban refuses the address on every listener; "
                       "set listeners = [...] to protect only some")
    if (get("usedns") or "warn").strip().lower() == "yes":
        j.notes.append("usedns = yes: edgeward bans addresses only; host names in logs are counted, not banned")
    return j


def _note_actions(j: Jail, action: str | None) -> None:
    for line in _lines(action):
        act = re.split(r"[\[\s]", line, maxsplit=1)[0]
        if not act or act.startswith(_BAN_ACTIONS):
            continue
        j.notes.append(f"action {act}: not carried over (edgeward bans at the edge and, with [guard.nft], "
                       "in nftables; it sends no mail and reports nowhere)")


def _toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)


def render(imported: Imported) -> str:
    """The jails as TOML `[jails.*]` tables, with what did not carry over as comments."""
    out = ["# Imported from fail2ban by `edgeward import fail2ban`, from:"]
    out.extend(f"#   {f}" for f in imported.files)
    out.append(f"# {len(imported.jails)} enabled jail(s); {len(imported.disabled)} not enabled, not imported"
               + (":" if imported.disabled else ""))
    out.extend("#   " + line for line in textwrap.wrap(", ".join(imported.disabled), 96, break_on_hyphens=False))
    for j in imported.jails:
        out.append("")
        out.extend(f"# {note}" for note in j.notes)
        out.append(f"[jails.{_toml_key(j.name)}]")
        out.extend(f"{k} = {_toml_value(v)}" for k, v in j.settings.items())
    return "\n".join(out) + "\n"
