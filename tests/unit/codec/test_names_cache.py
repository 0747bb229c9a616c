"""codec/_names.normalize_hostname remembers the names it saw (bounded), and answers the same."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edgeward.codec import _names


@given(st.binary(max_size=80))
def test_a_remembered_answer_is_the_computed_one(raw: bytes) -> None:
    first = _names.normalize_hostname(raw)
    assert _names.normalize_hostname(raw) == first == _names._normalize(raw)


def test_the_memory_stays_bounded() -> None:
    for i in range(_names.CACHE_SIZE + 10):
        assert _names.normalize_hostname(b"Host-%d.Example.ORG." % i) == f"host-{i}.example.org"
    assert len(_names._seen) <= _names.CACHE_SIZE
