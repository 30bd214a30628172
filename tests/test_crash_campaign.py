"""Issue 12 item 4, reduced: SIGKILL the daemon a few times under a busy, verifying guest on out-of-order
storage; nothing lost, nothing answered twice, no byte wrong, the guest never reconnects.

The full campaign (>= 200 kills) is `scripts/crash_campaign.py --kills 200`
(tests/e2e_support/crash_campaign.py describes what runs and what is checked).
"""

from __future__ import annotations

from e2e_support.crash_campaign import crash_campaign, describe_stall
from xenblk_vhost.backend.datapath.journal import JournalGeometry, RingJournal, format_area
from xenblk_vhost.backend.datapath.journal_file import journal_name


async def test_sigkills_under_a_busy_guest_lose_and_repeat_nothing(tmp_path):
    result = await crash_campaign(tmp_path, kills=5, seed=12)
    assert result.ok, (result.summary(), result.problems)
    assert result.kills == 5 and result.live_takeovers >= 1  # one killed before its takeover leaves it to the next
    # The journals did something: out-of-order storage leaves requests in flight at a kill.
    assert result.rerun + result.republished > 0, result.summary()


def test_a_stall_is_looked_up_in_the_rings_journal(tmp_path):
    # What the campaign prints when the guest waits in vain: each outstanding request by ring
    # position, and what the journal the live daemon keeps says of it.
    g = JournalGeometry.for_ring(32, 112, 0)
    area = bytearray(g.size)
    format_area(area, g, b"ring", taken_to=10, published=10)
    journal = RingJournal(area, g)
    ref = journal.record_taken(10, bytes(3 * 112), 3)  # positions 10, 11, 12
    journal.record_answered(ref + 1, 0, 10)
    (tmp_path / journal_name(1, "xvda", 0)).write_bytes(area)
    stall = {"seconds": 60.0, "rings": [{
        "ring": 0, "req_prod": 14, "req_prod_pvt": 14, "rsp_prod": 10, "rsp_cons": 10, "req_event": 11,
        "rsp_event": 11, "broken": None,
        "requests": [{"id": i, "op": 1, "sector": 8 * i, "nr_sectors": 8, "position": 10 + i, "slot": 10 + i,
                      "age_s": 61.0} for i in range(4)]}]}
    lines = describe_stall(stall, tmp_path, 1, "xvda")
    assert "journal taken_to" in lines[0] and "req_prod 14" in lines[0]
    assert lines[1].startswith("  id 0 op 1 sector 0 x8 position 10") and lines[1].endswith("taken, unanswered")
    assert lines[2].endswith("answered status 0 at rsp_pos 10")
    assert lines[3].endswith("taken, unanswered") and lines[4].endswith("not in the journal")
