"""GuestWarnings: what a guest makes us log is rate-limited per key, and says what it swallowed."""

from __future__ import annotations

import logging

import pytest

from xenblk_vhost.backend.xenbus.guest_warnings import GuestWarnings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "guest"]


def test_a_burst_gets_through_then_one_line_per_interval_with_the_count(caplog, clock):
    caplog.set_level(logging.INFO, logger="guest")
    w = GuestWarnings(logging.getLogger("guest"), burst=2, interval=10.0, clock=clock)
    spoke = [w.warn(5, "d%d: bad ring-ref %s", 5, i) for i in range(6)]
    assert spoke == [True, True, False, False, False, False]
    assert w.suppressed(5) == 4
    clock.now += 10.0  # one token back
    assert w.warn(5, "d%d: bad ring-ref %s", 5, 6)
    assert lines(caplog) == ["d5: bad ring-ref 0", "d5: bad ring-ref 1",
                             "d5: bad ring-ref 6 [4 similar warnings suppressed]"]
    assert w.suppressed(5) == 0
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_keys_are_limited_separately_and_levels_are_kept(caplog, clock):
    caplog.set_level(logging.INFO, logger="guest")
    w = GuestWarnings(logging.getLogger("guest"), burst=1, clock=clock)
    assert w.warn(1, "one") and not w.warn(1, "one again")
    assert w.log(logging.INFO, 2, "two")  # another guest is not silenced by the first
    assert [(r.getMessage(), r.levelno) for r in caplog.records] == [("one", logging.WARNING), ("two", logging.INFO)]


def test_tokens_refill_only_up_to_the_burst(clock):
    w = GuestWarnings(logging.getLogger("guest"), burst=3, interval=1.0, clock=clock)
    clock.now += 1000.0
    assert [w.warn("k", "x") for _ in range(5)] == [True, True, True, False, False]


def test_memory_is_bounded_by_forgetting_the_least_recent_key(clock):
    w = GuestWarnings(logging.getLogger("guest"), burst=1, max_keys=2, clock=clock)
    w.warn("a", "x"), w.warn("a", "x")
    assert w.suppressed("a") == 1
    w.warn("b", "x")
    w.warn("c", "x")  # "a" is forgotten: its next line gets a fresh burst
    assert w.suppressed("a") == 0 and w.warn("a", "x")


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        GuestWarnings(logging.getLogger("guest"), burst=0)
    with pytest.raises(ValueError):
        GuestWarnings(logging.getLogger("guest"), interval=0)
