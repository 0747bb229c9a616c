from __future__ import annotations

import pytest
import slixmpp
from hypothesis import given
from hypothesis import strategies as st

from edgeward.codec import NEED_MORE, CodecError, XMPPError, XMPPHeader, parse_xmpp_header
from edgeward.codec.xmpp import MAX_HEADER

NS = "http://etherx.jabber.org/streams"
CONVERSATIONS = (
    f"<?xml version='1.0'?><stream:stream to='Example.ORG' version='1.0' xml:lang='en' "
    f"xmlns='jabber:client' xmlns:stream='{NS}'>"
).encode()
PROSODY_S2S = (
    f"<?xml version='1.0'?>\n<stream:stream xmlns:db=\"jabber:server:dialback\" "
    f'xmlns:stream="{NS}" version="1.0" from="a.example" to="b.example." '
    f'xmlns="jabber:server" xml:lang="en">'
).encode()


def header(data: bytes) -> XMPPHeader:
    result = parse_xmpp_header(data)
    assert isinstance(result, XMPPHeader)
    return result


class TestValid:
    def test_client(self) -> None:
        assert header(CONVERSATIONS + b"<starttls") == XMPPHeader(
            "example.org", "jabber:client", "client", len(CONVERSATIONS)
        )

    def test_server(self) -> None:
        assert header(PROSODY_S2S) == XMPPHeader(
            "b.example", "jabber:server", "server", len(PROSODY_S2S)
        )

    def test_slixmpp_client(self) -> None:
        data = slixmpp.ClientXMPP("user@Chat.Example.NET/phone", "pw").stream_header.encode()
        assert header(data) == XMPPHeader("chat.example.net", "jabber:client", "client", len(data))

    def test_slixmpp_component(self) -> None:
        data = slixmpp.ComponentXMPP("upload.example.org", "s", "localhost", 5347)  # type: ignore[no-untyped-call]
        raw = data.stream_header.encode()
        assert header(raw).kind == "component"
        assert header(raw).to == "upload.example.org"

    @pytest.mark.parametrize(
        "data",
        [
            f"<stream:stream\n\txmlns:stream = \"{NS}\"\r\n  to='x.example'  >".encode(),
            f"<s:stream xmlns:s='{NS}' to='x.example'>".encode(),
            f"<?xml version='1.0' encoding='UTF-8'?>  \n<stream:stream to=\"x.example\" "
            f"xmlns:stream='{NS}'>".encode(),
        ],
    )
    def test_forms(self, data: bytes) -> None:
        assert header(data).to == "x.example"

    def test_no_to_and_unknown_namespace(self) -> None:
        h = header(f"<stream:stream xmlns:stream='{NS}' xmlns='urn:example'>".encode())
        assert (h.to, h.namespace, h.kind) == (None, "urn:example", "unknown")
        assert header(f"<stream:stream xmlns:stream='{NS}'>".encode()).namespace == ""

    def test_references_and_idn(self) -> None:
        data = f"<stream:stream xmlns:stream='{NS}' to='b&#xFC;cher.example'>".encode()
        assert header(data).to == "xn--bcher-kva.example"
        utf8 = f"<stream:stream xmlns:stream='{NS}' to='bücher.example'>".encode()
        assert header(utf8).to == "xn--bcher-kva.example"
        gt = f"<stream:stream xmlns:stream='{NS}' id='a>b&amp;&apos;' to='a.example'>".encode()
        assert header(gt).length == len(gt)  # '>' inside a value does not end the tag

    def test_every_prefix_needs_more(self) -> None:
        for data in (CONVERSATIONS, PROSODY_S2S):
            for n in range(len(data)):
                assert parse_xmpp_header(data[:n]) is NEED_MORE, (n, data[:n])


class TestMalformed:
    @pytest.mark.parametrize(
        "data",
        [
            b"<html>",
            b"<?php echo 1; ?>",
            b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'aaaa'>]><stream:stream>",
            b"<!-- c --><stream:stream>",
            b"<?xml version='1.0'?><?xml version='1.0'?>",
            b" <stream:stream>",
            f"<stream:stream xmlns:stream='{NS}'/>".encode(),
            f"<stream:stream xmlns:stream='{NS}' to='&a;'>".encode(),  # undefined entity
            f"<stream:stream xmlns:stream='{NS}' to='a&b'>".encode(),
            f"<stream:stream xmlns:stream='{NS}' to='a<b'>".encode(),
            f"<stream:stream xmlns:stream='{NS}' to=a.example>".encode(),
            f"<stream:stream xmlns:stream='{NS}'to='a'>".encode(),  # no space between
            f"<stream:stream xmlns:stream='{NS}' to='a' to='b'>".encode(),
            f"<stream:stream xmlns:stream='{NS}' to='bad domain'>".encode(),
            f"<stream:stream xmlns:stream='{NS}' to='\xff'>".encode("latin-1"),
            f"<stream:stream xmlns:stream='{NS}' to='&#x110000;'>".encode(),
            b"<stream:stream xmlns:stream='jabber:client'>",  # wrong streams namespace
            f"<stream:stream xmlns:s='{NS}'>".encode(),  # prefix not bound
            f"<stream:features xmlns:stream='{NS}'>".encode(),
            f"<stream:stream xmlns:stream='{NS}' 1a='x'>".encode(),
        ],
    )
    def test_rejected(self, data: bytes) -> None:
        with pytest.raises(XMPPError):
            parse_xmpp_header(data)

    def test_bounded(self) -> None:
        data = f"<stream:stream xmlns:stream='{NS}' pad='".encode() + b"x" * MAX_HEADER
        assert parse_xmpp_header(data[: MAX_HEADER - 1]) is NEED_MORE
        with pytest.raises(XMPPError, match="exceeds"):
            parse_xmpp_header(data)

    def test_entity_expansion_is_not_possible(self) -> None:
        bomb = (
            b"<?xml version='1.0'?><!DOCTYPE lolz [<!ENTITY lol 'lol'>"
            b"<!ENTITY lol2 '&lol;&lol;&lol;&lol;'>]><stream:stream to='&lol2;'>"
        )
        with pytest.raises(XMPPError):
            parse_xmpp_header(bomb)


class TestProperties:
    @given(st.binary(max_size=300))
    def test_any_bytes(self, data: bytes) -> None:
        for candidate in (data, b"<" + data, b"<stream:stream " + data, CONVERSATIONS[:60] + data):
            try:
                result = parse_xmpp_header(candidate)
            except CodecError:
                continue
            assert result is NEED_MORE or result.length <= len(candidate)  # type: ignore[union-attr]

    @given(
        st.from_regex(r"[a-z0-9]{1,12}(\.[a-z0-9]{1,12}){1,3}", fullmatch=True),
        st.sampled_from(["jabber:client", "jabber:server", "jabber:component:accept"]),
        st.permutations(["to", "xmlns", "xmlns:stream", "version"]),
        st.sampled_from(["'", '"']),
        st.sampled_from([" ", "\n", "\t ", "  \r\n"]),
        st.booleans(),
    )
    def test_round_trip(
        self, to: str, ns: str, order: list[str], quote: str, ws: str, decl: bool
    ) -> None:
        values = {"to": to, "xmlns": ns, "xmlns:stream": NS, "version": "1.0"}
        attrs = "".join(f"{ws}{k}={quote}{values[k]}{quote}" for k in order)
        prolog = "<?xml version='1.0'?>" + ws if decl else ""
        wire = f"{prolog}<stream:stream{attrs}{ws}>".encode()
        h = header(wire + b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
        assert (h.to, h.namespace, h.length) == (to, ns, len(wire))
        for n in range(0, len(wire), 5):
            assert parse_xmpp_header(wire[:n]) is NEED_MORE
