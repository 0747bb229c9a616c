"""forward = "kernel": the nftables table rendered from the config, and what check refuses."""

from __future__ import annotations

import pytest

from edgeward.app import build_runtime, load_config
from edgeward.config.loader import ConfigError, loads
from edgeward.kernel_forward import plan, problems, render

BASE = '[edge]\nadmin = "127.0.0.1:9901"\n'
TURN = BASE + """
[services.chat-ports]
listen = ["[::]:5222", "[::]:5269"]
to = "10.8.0.2"

[services.turn-udp]
listen = ["udp/[::]:3478", "udp/[::]:49152-49452"]
to = "10.8.0.2"
forward = "kernel"

[services.web-fast]
listen = ["203.0.113.5:8443"]
to = "10.8.0.2:443"
forward = "kernel"
masquerade = true

[services.v6]
listen = ["udp/[2001:db8::1]:10000"]
to = "2001:db8:8::2"
forward = "kernel"
"""


def kernel_problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as ei:
        loads(text, "edge.toml", checks=(problems,))
    return [str(p) for p in ei.value.problems]


def test_the_table_forwards_each_listen_address_and_masquerades_where_asked() -> None:
    cfg = loads(TURN, "edge.toml", checks=(problems,))
    text = render(cfg)
    rules = [line.strip() for line in text.splitlines()]
    assert "add table inet edgeward_fwd" in rules and "delete table inet edgeward_fwd" in rules
    assert 'meta nfproto ipv4 udp dport 3478 dnat ip to 10.8.0.2 comment "turn-udp"' in rules
    assert 'meta nfproto ipv4 udp dport 49152-49452 dnat ip to 10.8.0.2 comment "turn-udp"' in rules
    assert 'meta nfproto ipv4 ip daddr 203.0.113.5 tcp dport 8443 dnat ip to 10.8.0.2:443 comment "web-fast"' in rules
    assert 'meta nfproto ipv6 ip6 daddr 2001:db8::1 udp dport 10000 dnat ip6 to 2001:db8:8::2 comment "v6"' in rules
    assert 'ct status dnat ip daddr 10.8.0.2 tcp dport 443 masquerade comment "web-fast"' in rules
    assert sum("masquerade" in r for r in rules) == 1  # only where asked: the others keep the client's address
    assert not any("5222" in r for r in rules)  # forwarded at the edge
    assert len(plan(cfg)) == 4


def test_kernel_services_get_no_listener_at_the_edge() -> None:
    rt = build_runtime(loads(TURN, "edge.toml"))
    ports = {key[2] for key in rt.listeners}
    assert ports == {5222, 5269}


@pytest.mark.parametrize(("extra", "says"), [
    ('names = ["a.example.org"]', "names needs the edge to see the traffic"),
    ('protocol = "tls"', "protocol needs sniffing"),
    ('proxy_protocol = "v2"', "the kernel cannot send a PROXY header"),
    ('source = ["10.0.0.0/8"]', "source needs the edge to see the traffic"),
])
def test_what_needs_the_edge_is_refused_at_its_line(extra: str, says: str) -> None:
    text = BASE + f'[services.k]\nlisten = ["[::]:7000"]\nto = "10.8.0.2"\nforward = "kernel"\n{extra}\n'
    (p,) = kernel_problems(text)
    assert p.startswith("edge.toml:7:") and says in p


def test_targets_the_kernel_cannot_forward_to() -> None:
    for to, says in [('"backend.lan"', "not the name 'backend.lan'"),
                     ('"http://10.8.0.2"', "to an IP address, not"),
                     ('"unix:/run/x.sock"', "to an IP address, not")]:
        (p,) = kernel_problems(BASE + f'[services.k]\nlisten = ["[::]:7000"]\nto = {to}\nforward = "kernel"\n')
        assert says in p, p
    (p,) = kernel_problems(BASE + '[services.k]\nlisten = ["udp/[::]:7000-7010"]\nto = "10.8.0.2:9000"\n'
                           'forward = "kernel"\n')
    assert "cannot all go to port 9000" in p
    (p,) = kernel_problems(BASE + '[pools.p]\nservers = ["10.8.0.2", "10.8.0.3"]\n'
                           '[services.k]\nlisten = ["[::]:7000"]\nto = "p"\nforward = "kernel"\n')
    assert "sends to one server, pool 'p' has 2" in p


def test_bans_must_reach_the_kernel_path() -> None:
    jail = '\n[jails.j]\nlogpath = ["/var/log/x.log"]\nfailregex = ["fail from <HOST>"]\n'
    k = BASE + '[services.k]\nlisten = ["udp/[::]:7000"]\nto = "10.8.0.2"\nforward = "kernel"\n'
    (p,) = kernel_problems(k + jail)
    assert "set [guard.nft] enabled = true" in p
    (p,) = kernel_problems(k + '[guard.nft]\nenabled = true\nhook = "input"\n' + jail)
    assert "does not see forwarded packets" in p
    loads(k + '[guard.nft]\nenabled = true\n' + jail, "edge.toml", checks=(problems,))
    (p,) = kernel_problems(BASE + '[services.k]\nlisten = ["[::]:7000"]\nto = "10.8.0.2"\nmasquerade = true\n')
    assert "masquerade applies to forward = \"kernel\" only" in p


def test_no_kernel_service_renders_an_empty_table() -> None:
    text = render(loads(BASE + '[services.k]\nlisten = ["[::]:7000"]\nto = "10.8.0.2"\n', "edge.toml"))
    assert "dnat" not in text and "table inet edgeward_fwd {" in text


def test_the_loader_of_the_running_edge_runs_these_checks(tmp_path: object) -> None:
    from pathlib import Path
    p = Path(str(tmp_path)) / "edge.toml"
    p.write_text(BASE + '[services.k]\nlisten = ["[::]:7000"]\nto = "10.8.0.2"\nforward = "kernel"\nnames = ["x.org"]\n')
    with pytest.raises(ConfigError, match="names needs the edge"):
        load_config(p)


def test_edgeward_nft_prints_the_kernel_table_beside_the_transparent_return_path(tmp_path: object) -> None:
    import subprocess
    import sys
    from pathlib import Path
    p = Path(str(tmp_path)) / "edge.toml"
    p.write_text(TURN)
    r = subprocess.run([sys.executable, "-m", "edgeward.cli", "nft", str(p)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("#!/bin/sh") and "no service asks for it" in r.stdout  # no transparent service
    assert "nft -f - <<'EOF'\n" in r.stdout and 'dnat ip to 10.8.0.2 comment "turn-udp"' in r.stdout
    assert r.stdout.rstrip().endswith("EOF")


def test_kernel_forwarding_cannot_hand_off_or_be_transparent() -> None:
    (p,) = kernel_problems(BASE + '[handoffs.h]\nsocket = "/run/h.sock"\n'
                           '[services.k]\nlisten = ["[::]:7000"]\nto = "h"\nforward = "kernel"\n')
    assert "cannot hand a connection to a local server" in p
    (p,) = kernel_problems(BASE + '[services.k]\nlisten = ["[::]:7000"]\nto = "10.8.0.2"\nforward = "kernel"\n'
                           'transparent = true\n')
    assert "transparent is for the edge's own connections" in p


def test_the_recorded_table_name_is_taken_only_when_edgeward_could_have_written_it(tmp_path: object) -> None:
    """state_dir/kernel-table names the table a killed edge left (removed at the next start); a
    name nft scripts could not carry (written by someone else, or damaged) is left alone."""
    from pathlib import Path

    from edgeward.config.schema import KernelSettings
    from edgeward.kernel_forward import KernelTable

    state = Path(str(tmp_path))
    (state / "kernel-table").write_text("edgeward_old\n")
    left = KernelTable(KernelSettings(), str(state))
    assert left.applied and left.settings.table == "edgeward_old"
    (state / "kernel-table").write_text("x; flush ruleset\n")
    assert not KernelTable(KernelSettings(), str(state)).applied
    assert not KernelTable(KernelSettings(), None).applied  # no state directory: nothing recorded
