"""Shared bans without Redis: the wire format, the merge rule, the store's part, the options.

The merge rule (`plan_merge`) is what makes reconnecting loss-free; the property tests check
that whatever a node and Redis each hold, after the merge both sides hold the same bans, and
those are exactly what the rule says (latest start wins; an unban at T lifts what started at
or before T)."""

from __future__ import annotations

import json
import math
import sqlite3
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edgeward.config.loader import validate
from edgeward.config.schema import Config, ShareSettings, redact_url
from edgeward.guard.share import (
    BadRecord,
    decode_ban,
    encode_ban,
    field_of,
    key_of,
    plan_merge,
    same_ban,
)
from edgeward.guard.store import BanRecord, Store

NOW = 1_000_000.0


def rec(addr: str = "192.0.2.1", jail: str = "sshd", start: float = NOW - 10, end: float | None = None,
        origin: str | None = None, **kw: object) -> BanRecord:
    return BanRecord(address=addr, jail=jail, reason=str(kw.get("reason", "r")), lines=("l1", "l2"),
                     start=start, end=end, origin=origin)


# -- wire format ------------------------------------------------------------------------------


def test_a_ban_round_trips_and_our_own_origin_comes_back_as_ours() -> None:
    r = BanRecord("2001:db8::1", "sshd", "5 failures", ("a", "b"), NOW, NOW + 60, 3, ("ssh",))
    doc = encode_ban(r, "edge-1")
    assert json.loads(doc)["origin"] == "edge-1"
    assert decode_ban(doc, "edge-1") == r  # ours: origin None again
    assert decode_ban(doc, "edge-2") == BanRecord("2001:db8::1", "sshd", "5 failures", ("a", "b"), NOW, NOW + 60,
                                                  3, ("ssh",), origin="edge-1")
    assert key_of(field_of("2001:db8::1", "a|b")) == ("2001:db8::1", "a|b")


def test_long_matched_lines_are_cut_for_redis() -> None:
    r = rec(origin=None)
    r = BanRecord(r.address, r.jail, r.reason, tuple("x" * 2000 for _ in range(50)), r.start, None)
    back = decode_ban(encode_ban(r, "n"), "n")
    assert len(back.lines) == 10 and all(len(x) == 500 for x in back.lines)


@pytest.mark.parametrize("raw", [
    "", "[]", "{}", "not json", '{"address": "x", "jail": "j", "start": 1, "origin": "n"}',
    '{"address": "192.0.2.1", "jail": "", "start": 1, "origin": "n"}',
    '{"address": "192.0.2.1", "jail": "j", "start": "1", "origin": "n"}',
    '{"address": "192.0.2.1", "jail": "j", "start": 1e999, "origin": "n"}',
    '{"address": "192.0.2.1", "jail": "j", "start": 1, "end": true, "origin": "n"}',
    '{"address": "192.0.2.1", "jail": "j", "start": 1, "origin": "n", "listeners": "all"}',
    '{"address": "192.0.2.1", "jail": "j", "start": 1}',
])
def test_records_not_written_by_edgeward_are_refused(raw: str) -> None:
    with pytest.raises(BadRecord):
        decode_ban(raw, "me")


@given(st.binary(max_size=300))
def test_any_bytes_decode_to_a_ban_or_a_bad_record(raw: bytes) -> None:
    try:
        r = decode_ban(raw, "me")
    except BadRecord:
        return
    assert r.address and r.jail and math.isfinite(r.start)


def test_the_key_needs_address_and_jail() -> None:
    for bad in ("", "192.0.2.1", "192.0.2.1|"):
        with pytest.raises(BadRecord):
            key_of(bad)


# -- the merge rule ---------------------------------------------------------------------------


def test_merge_pushes_ours_adopts_theirs_and_applies_unbans() -> None:
    mine_only = rec("192.0.2.1")
    theirs_only = rec("192.0.2.2", origin="b")
    ours_newer, theirs_older = rec("192.0.2.3", start=NOW - 1), rec("192.0.2.3", start=NOW - 5, origin="b")
    lifted_there = rec("192.0.2.4", start=NOW - 50)
    lifted_here = rec("192.0.2.5", start=NOW - 50, origin="b")
    rebanned_after_unban = rec("192.0.2.6", start=NOW - 1, origin="b")
    ended = rec("192.0.2.7", end=NOW - 1)
    plan = plan_merge(
        [mine_only, ours_newer, lifted_there, ended],
        {("192.0.2.5", "sshd"): NOW - 40, ("192.0.2.6", "sshd"): NOW - 30},
        [theirs_only, theirs_older, lifted_here, rebanned_after_unban, rec("192.0.2.8", end=NOW - 1)],
        {("192.0.2.4", "sshd"): NOW - 20},
        NOW,
    )
    assert plan.push == [ours_newer, mine_only] or sorted(plan.push, key=lambda r: r.address) == [mine_only, ours_newer]
    assert sorted(plan.adopt, key=lambda r: r.address) == [theirs_only, rebanned_after_unban]
    assert plan.drop == {("192.0.2.4", "sshd"): NOW - 20}
    assert plan.push_unbans == {("192.0.2.5", "sshd"): NOW - 40, ("192.0.2.6", "sshd"): NOW - 30}


def test_a_tie_takes_redis_view_and_the_same_ban_is_left_alone() -> None:
    here = rec(origin=None, reason="local words")
    same = rec(origin=None, reason="other words")  # same start, end, listeners, origin: the same ban
    other = rec(origin="b")
    assert not plan_merge([here], {}, [same], {}, NOW).adopt
    assert plan_merge([here], {}, [other], {}, NOW).adopt == [other]
    assert same_ban(here, same) and not same_ban(here, other)


ADDRS = st.sampled_from(["192.0.2.1", "192.0.2.2", "2001:db8::1"])
JAILS = st.sampled_from(["sshd", "manual"])
TIMES = st.integers(min_value=0, max_value=20).map(lambda t: NOW - 20 + t)
BANS = st.builds(lambda a, j, s, e, o: rec(a, j, s, None if e is None else s + e, o), ADDRS, JAILS, TIMES,
                 st.none() | st.integers(1, 40).map(float), st.sampled_from([None, "b", "c"]))
UNBANS = st.dictionaries(st.tuples(ADDRS, JAILS), TIMES, max_size=4)


def _apply(local: dict[tuple[str, str], BanRecord], local_unbans: dict[tuple[str, str], float],
           remote: dict[tuple[str, str], BanRecord], remote_unbans: dict[tuple[str, str], float]) -> None:
    """Carry out a plan the way the scripts and the guard do (each write checks the rule again)."""
    plan = plan_merge(local.values(), local_unbans, remote.values(), remote_unbans, NOW)
    for key, at in plan.push_unbans.items():
        remote_unbans[key] = max(at, remote_unbans.get(key, -math.inf))
        if key in remote and remote[key].start <= at:
            del remote[key]
    for key, at in plan.drop.items():
        local_unbans[key] = max(at, local_unbans.get(key, -math.inf))
        if key in local and local[key].start <= at:
            del local[key]
    for r in plan.push:
        key = (r.address, r.jail)
        if remote_unbans.get(key, -math.inf) < r.start and (key not in remote or remote[key].start <= r.start):
            remote[key] = r
    for r in plan.adopt:
        key = (r.address, r.jail)
        if key not in local or local[key].start <= r.start:
            local[key] = r


def _keyed(bans: list[BanRecord]) -> dict[tuple[str, str], BanRecord]:
    out: dict[tuple[str, str], BanRecord] = {}
    for b in bans:  # a node holds one ban per key: the latest
        if (b.address, b.jail) not in out or out[(b.address, b.jail)].start < b.start:
            out[(b.address, b.jail)] = b
    return out


@settings(max_examples=300)
@given(st.lists(BANS, max_size=6), UNBANS, st.lists(BANS, max_size=6), UNBANS)
def test_after_a_merge_both_sides_hold_the_same_bans_the_rule_says(
    mine: list[BanRecord], my_unbans: dict[tuple[str, str], float],
    theirs: list[BanRecord], their_unbans: dict[tuple[str, str], float],
) -> None:
    # States the two sides can be in: a node holds no ended ban (the guard lifts it at its time) and
    # Redis none either (pruned before merging), nor one its own unbans lift (the scripts refuse it).
    live_only = [b for b in mine if b.end is None or b.end > NOW]
    local = _keyed(live_only)
    remote = {k: b for k, b in _keyed([b for b in theirs if b.end is None or b.end > NOW]).items()
              if b.start > their_unbans.get(k, -math.inf)}
    local_unbans, remote_unbans = dict(my_unbans), dict(their_unbans)
    # What the rule says: for each key the latest-starting live ban, unless an unban came at or after it.
    expected = {}
    for key in local.keys() | remote.keys():
        lifted = max(local_unbans.get(key, -math.inf), remote_unbans.get(key, -math.inf))
        cands = [b for b in (local.get(key), remote.get(key))
                 if b is not None and b.start > lifted and (b.end is None or b.end > NOW)]
        if cands:
            expected[key] = max(cands, key=lambda b: b.start).start
    _apply(local, local_unbans, remote, remote_unbans)
    live = lambda d: {k: v.start for k, v in d.items() if v.end is None or v.end > NOW}  # noqa: E731
    assert live(local) == expected
    assert live(remote) == expected
    # Redis now knows every unban the node knew (for the nodes merging after it).
    assert all(remote_unbans.get(k, -math.inf) >= at for k, at in my_unbans.items())
    # And a second merge changes nothing: the two sides agree.
    again = plan_merge(local.values(), local_unbans, remote.values(), remote_unbans, NOW)
    assert not again.push and not again.adopt and not again.drop and not again.push_unbans


# -- the store ----------------------------------------------------------------------------------


def test_a_store_of_schema_1_gains_the_origin_column(tmp_path: Path) -> None:
    db = tmp_path / "g.sqlite"
    old = sqlite3.connect(db)
    old.executescript("""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
CREATE TABLE bans (address TEXT NOT NULL, jail TEXT NOT NULL, reason TEXT NOT NULL, lines TEXT NOT NULL,
  start REAL NOT NULL, end REAL, count INTEGER NOT NULL, listeners TEXT, PRIMARY KEY (address, jail));
INSERT INTO bans VALUES ('192.0.2.1', 'sshd', 'old', '[]', 1.0, NULL, 1, NULL);
""")
    old.close()
    s = Store(db)
    try:
        [r] = s.run(s.active_bans)
        assert r.address == "192.0.2.1" and r.origin is None
        s.run(s.add_ban, rec("192.0.2.2", origin="b"), -1.0)
        assert {x.origin for x in s.run(s.active_bans)} == {None, "b"}
        assert s.run(s.history) == [("192.0.2.2", "sshd", NOW - 10, -1.0)]
        s.run(lambda: s.add_ban(rec("192.0.2.3", origin="c"), -1.0, history=False))
        assert len(s.run(s.history)) == 1  # a peer's ban does not grow this node's bans
    finally:
        s.close()
    assert sqlite3.connect(db).execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("2",)


def test_unbans_are_remembered_with_the_ban_removal(tmp_path: Path) -> None:
    s = Store(tmp_path / "g.sqlite")
    try:
        s.run(s.add_ban, rec("192.0.2.1", start=NOW - 5), -1.0)
        s.run(s.add_ban, rec("192.0.2.2", start=NOW + 5), -1.0)
        s.run(lambda: s.remove_ban("192.0.2.1", None, lifted_at=NOW))
        # An unban from elsewhere lifts only what started before it, and is remembered even with no ban here.
        s.run(lambda: s.remove_ban("192.0.2.2", "sshd", lifted_at=NOW, started_by=NOW))
        s.run(lambda: s.remove_ban("192.0.2.9", "sshd", lifted_at=NOW - 1, started_by=NOW - 1))
        assert [r.address for r in s.run(s.active_bans)] == ["192.0.2.2"]
        assert s.run(s.lifted, 0.0) == {("192.0.2.1", "sshd"): NOW, ("192.0.2.2", "sshd"): NOW,
                                        ("192.0.2.9", "sshd"): NOW - 1}
        s.run(lambda: s.remove_ban("192.0.2.9", "sshd", lifted_at=NOW - 100))  # an older unban: kept the newer
        assert s.run(s.lifted, 0.0)[("192.0.2.9", "sshd")] == NOW - 1
        assert s.run(s.purge_lifted, NOW) == 1
        assert set(s.run(s.lifted, 0.0)) == {("192.0.2.1", "sshd"), ("192.0.2.2", "sshd")}
    finally:
        s.close()


# -- options ------------------------------------------------------------------------------------


def share(**kw: object) -> ShareSettings:
    return validate(Config, {"guard": {"share": kw}}).guard.share


def test_share_options() -> None:
    assert share().redis is None  # not shared by default
    s = share(redis="rediss://edge:pw@redis.example.org:6380/2", ca_file="/etc/ssl/ca.pem", node="edge-1",
              retry_max="1m", unban_retention="1d")
    assert (s.retry_max, s.unban_retention, s.node) == (60.0, 86400.0, "edge-1")
    assert share(redis="unix:///run/redis/redis.sock?db=1").redis == "unix:///run/redis/redis.sock?db=1"
    assert share(redis="redis://[::1]:6379").redis == "redis://[::1]:6379"


@pytest.mark.parametrize(("kw", "words"), [
    ({"redis": "http://127.0.0.1:6379"}, "redis://, rediss://"),
    ({"redis": "redis://"}, "no host"),
    ({"redis": "redis://h:70000"}, "Port out of range"),
    ({"redis": "redis://h/cache"}, "database number"),
    ({"redis": "unix://relative.sock"}, "absolute path"),
    ({"redis": "redis://:pw@h", "password_file": "/etc/pw"}, "not both"),
    ({"redis": "redis://h", "ca_file": "/ca.pem"}, "only for a rediss://"),
    ({"redis": "rediss://h", "cert_file": "/c.pem"}, "go together"),
    ({"redis": "redis://h", "node": "two words"}, "without spaces"),
    ({"redis": "redis://h", "retry_min": "10s", "retry_max": "1s"}, "retry_max"),
    ({"redis": "redis://h", "hots": "x"}, "hots"),
])
def test_bad_share_options_are_refused_clearly(kw: dict[str, object], words: str) -> None:
    with pytest.raises(ValidationError) as e:
        share(**kw)
    assert words in str(e.value)


def test_the_password_never_shows_in_errors_or_status() -> None:
    with pytest.raises(ValidationError) as e:
        share(redis="redis://user:hunter2@h/cache")
    assert "hunter2" not in str(e.value).split("input_value")[0]
    assert redact_url("rediss://user:hunter2@h:1/0") == "rediss://user:***@h:1/0"
    assert redact_url("redis://:hunter2@h") == "redis://:***@h"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_the_share_example_in_docs_is_a_valid_config() -> None:
    text = (Path(__file__).resolve().parents[3] / "docs" / "config.md").read_text(encoding="utf-8")
    section = text[text.index("### Shared bans between edge nodes (Redis)"):]
    start = section.index("```toml") + len("```toml")
    cfg = validate(Config, tomllib.loads(section[start:section.index("```\n", start)]))
    assert cfg.guard.share.redis == "rediss://edge@redis.internal:6380/0" and cfg.guard.share.node == "edge-paris-1"


def test_check_reports_unreadable_share_files_at_their_line(tmp_path: Path) -> None:
    from edgeward.app import load_config
    from edgeward.config.loader import ConfigError

    pw = tmp_path / "pw"
    pw.write_text("x\n")
    good = tmp_path / "good.toml"
    good.write_text(f'[guard.share]\nredis = "redis://127.0.0.1:1/0"\npassword_file = "{pw}"\n')
    assert load_config(good).guard.share.password_file == str(pw)  # unreachable Redis is no config error
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[guard.share]\nredis = "rediss://127.0.0.1:1/0"\nca_file = "{tmp_path}/missing.pem"\n')
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert f"{bad}:3:" in str(e.value) and "guard.share.ca_file: cannot read" in str(e.value)


# -- the guard's side (no Redis: a recorder in place of the share) ----------------------------------


class _Recorder:
    node = "me"

    def __init__(self) -> None:
        self.bans: list[BanRecord] = []
        self.unbans: list[dict[tuple[str, str], float]] = []

    def banned(self, rec: BanRecord) -> None:
        self.bans.append(rec)

    def unbanned(self, lifted: dict[tuple[str, str], float]) -> None:
        self.unbans.append(dict(lifted))

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> dict[str, object]:
        return {}


async def test_the_guard_applies_received_changes_by_the_rule_and_publishes_only_its_own(tmp_path: Path) -> None:
    from edgeward.config.schema import GuardSettings
    from edgeward.guard.service import Guard

    now = [1000.0]
    settings = validate(GuardSettings, {"ignoreip": ["198.51.100.0/24"],
                                             "share": {"redis": "redis://127.0.0.1:1/0"}})
    g = Guard(settings, {}, db_path=str(tmp_path / "g.sqlite"), clock=lambda: now[0])
    rec_share = _Recorder()
    g.share = rec_share  # type: ignore[assignment]
    await g.start()
    try:
        theirs = BanRecord("192.0.2.1", "sshd", "r", (), 1005.0, None, origin="b")  # b's clock is ahead
        assert await g.apply_remote_ban(theirs)
        assert g.banset.is_banned("192.0.2.1")
        assert not await g.apply_remote_ban(theirs)  # already held
        assert not await g.apply_remote_ban(BanRecord("192.0.2.1", "sshd", "r", (), 1001.0, None, origin="c"))
        assert not await g.apply_remote_ban(BanRecord("198.51.100.9", "sshd", "r", (), 1001.0, None, origin="b"))
        assert await g.apply_remote_ban(BanRecord("198.51.100.9", "manual", "r", (), 1001.0, None, origin="b"))
        assert not await g.apply_remote_ban(BanRecord("192.0.2.2", "sshd", "r", (), 900.0, 990.0, origin="b"))
        assert rec_share.bans == []  # nothing received is published again
        assert [b["origin"] for b in g.bans()] == ["b", "b"]
        # An unban older than the ban leaves it; a later one lifts it and is remembered.
        assert not await g.apply_remote_unban("192.0.2.1", "sshd", 1004.0)
        assert g.banset.is_banned("192.0.2.1")
        # Our own unban of it, at our clock's 1000, is published as lifting the ban we saw (1005).
        assert await g.unban("192.0.2.1") == ["192.0.2.1"]
        assert rec_share.unbans == [{("192.0.2.1", "sshd"): 1005.0}]
        assert await g.lifted_since(0) == {("192.0.2.1", "sshd"): 1005.0}
        # An unban stamped by a clock ahead of ours (1010): a new ban here starts after it, so the
        # other nodes and Redis keep it rather than count it as lifted.
        assert not await g.apply_remote_unban("192.0.2.5", "manual", 1010.0)
        await g.ban("manual", "192.0.2.5")
        assert rec_share.bans[-1].address == "192.0.2.5" and rec_share.bans[-1].start == pytest.approx(1010.001)
        await g.unban("192.0.2.5")
        assert rec_share.unbans[-1] == {("192.0.2.5", "manual"): pytest.approx(1010.001)}
        rec_share.bans.clear()
        # Our own ban is published, with no origin (ours); shown with this node's name.
        await g.ban("manual", "192.0.2.3")
        assert [r.address for r in rec_share.bans] == ["192.0.2.3"] and rec_share.bans[0].origin is None
        assert {b["address"]: b["origin"] for b in g.bans()}["192.0.2.3"] == "me"
        assert await g.apply_remote_unban("198.51.100.9", "manual", 1002.0)
        assert not g.banset.is_banned("198.51.100.9")
        assert await g.apply_remote_ban(BanRecord("192.0.2.4", "sshd", "r", (), 1001.0, 5000.0, origin="b"))
    finally:
        await g.stop()
    # The peers' bans are in the store: a restart without Redis enforces them.
    g2 = Guard(validate(GuardSettings, {}), {}, db_path=str(tmp_path / "g.sqlite"), clock=lambda: now[0])
    await g2.start()
    try:
        assert {(b["address"], b["origin"]) for b in g2.bans()} == {("192.0.2.3", None), ("192.0.2.4", "b")}
        assert g2.banset.is_banned("192.0.2.4")
    finally:
        await g2.stop()
