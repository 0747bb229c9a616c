"""wrk's text report, parsed from real wrk 4.1 (Debian) output captured against the
bench's nginx upstream; and what the HTTP cases make of a result."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.cases import WRK_CASES
from bench.wrk import WrkError, WrkResult, parse_wrk, wrk_argv

FIXTURES = Path(__file__).parent / "fixtures"


def _fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_keepalive_report() -> None:
    r = parse_wrk(_fixture("wrk_http_keepalive.txt"))
    assert r.requests == 401521
    assert r.seconds == pytest.approx(3.02)
    assert r.requests_per_s == pytest.approx(133083.05)
    assert r.bytes_read == round(94.20 * 2**20)
    assert r.connections == 50
    # "176.00us", "738.00us", "3.55ms", "8.05ms": every unit becomes milliseconds.
    assert r.latency_ms == pytest.approx({"p50": 0.176, "p75": 0.738, "p90": 3.55, "p99": 8.05})
    assert r.errors == {}
    assert r.ok_per_s == pytest.approx(401521 / 3.02)


def test_connection_close_report_over_tls() -> None:
    r = parse_wrk(_fixture("wrk_https_connection_close.txt"))
    assert r.requests == 11513
    assert r.seconds == pytest.approx(3.10)
    assert r.latency_ms["p99"] == pytest.approx(38.02)
    assert r.socket_errors == 0 and r.non_2xx == 0


def test_non_2xx_responses_are_not_counted_as_good() -> None:
    r = parse_wrk(_fixture("wrk_non2xx.txt"))
    assert r.requests == 221372
    assert r.non_2xx == 221372
    assert r.requests_per_s == pytest.approx(110178.08)  # wrk counts them in its rate
    assert r.ok_per_s == 0.0  # the bench does not


def test_socket_errors() -> None:
    # The upstream was stopped in the middle of this run.
    r = parse_wrk(_fixture("wrk_socket_errors.txt"))
    assert r.errors == {"connect": 0, "read": 51, "write": 169964, "timeout": 0}
    assert r.socket_errors == 51 + 169964
    assert r.requests == 129689


def test_not_a_report() -> None:
    with pytest.raises(WrkError, match="unable to connect"):
        parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")
    with pytest.raises(WrkError, match="no output"):
        parse_wrk("")


def test_seconds_and_minutes_units() -> None:
    text = _fixture("wrk_http_keepalive.txt")
    text = text.replace("99%    8.05ms", "99%    1.20s").replace("in 3.02s,", "in 1.00m,")
    r = parse_wrk(text)
    assert r.latency_ms["p99"] == pytest.approx(1200.0)
    assert r.seconds == pytest.approx(60.0)


def test_wrk_argv() -> None:
    argv = wrk_argv("http://127.0.0.1:1/", 10)
    assert argv[:5] == ["wrk", "-t1", "-c50", "-d10s", "--latency"]
    assert argv[-1] == "http://127.0.0.1:1/"
    assert "Connection: close" not in argv
    close = wrk_argv("https://127.0.0.1:1/", 3, close=True)
    assert close[-3:] == ["-H", "Connection: close", "https://127.0.0.1:1/"]


def _result(**kw: object) -> WrkResult:
    base: dict[str, object] = {
        "requests": 10_000,
        "seconds": 2.0,
        "bytes_read": 1,
        "requests_per_s": 5000.0,
        "latency_ms": {"p50": 1.0, "p75": 2.0, "p90": 3.0, "p99": 9.0},
    }
    base.update(kw)
    return WrkResult(**base)  # type: ignore[arg-type]


def test_case_metrics_keepalive() -> None:
    m = WRK_CASES["https_keepalive"].metrics(_result(errors={"status": 1000}), proxy_cpu=0.9)
    assert m == pytest.approx(
        {
            "https_req_per_s": 4500.0,
            "https_p50_ms": 1.0,
            "https_p99_ms": 9.0,
            # Per 1k good responses: 0.9 CPU s / 9k.
            "cpu_s_per_1k_https_req": 0.1,
        }
    )
    # direct has no proxy: no CPU metric.
    assert "cpu_s_per_1k_http_req" not in WRK_CASES["http_keepalive"].metrics(_result(), None)


def test_case_metrics_handshakes() -> None:
    m = WRK_CASES["tls_handshakes"].metrics(_result(), proxy_cpu=2.0)
    # wrk's latency clock starts after the handshake: not a handshake metric.
    assert m == pytest.approx({"tls_handshakes_per_s": 5000.0, "cpu_s_per_1k_handshakes": 0.2})
