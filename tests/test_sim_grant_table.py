"""The simulated grant table: layout from Xen's header, Xen's checks, real atomics.

The layout and GTF_* flags are compared with xen/grant_table.h compiled by
gcc. The pin/check/revoke rules are exercised on a table in shared memory,
and the revoke-vs-pin race is run between two processes to show that a
guest can never revoke an entry while Xen's side holds it pinned.
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap

import pytest

from xenblk_vhost.sim import grant_table as gt
from xenblk_vhost.xen._libc import buffer_address
from xenblk_vhost.xen.interfaces import PAGE_SIZE, GrantStatus

C_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#define P(name, value) printf("%s %lld\n", name, (long long)(value))
int main(void) {
    P("GTF_invalid", GTF_invalid);
    P("GTF_permit_access", GTF_permit_access);
    P("GTF_accept_transfer", GTF_accept_transfer);
    P("GTF_transitive", GTF_transitive);
    P("GTF_type_mask", GTF_type_mask);
    P("GTF_readonly", GTF_readonly);
    P("GTF_reading", GTF_reading);
    P("GTF_writing", GTF_writing);
    P("GTF_sub_page", GTF_sub_page);
    P("sizeof", sizeof(struct grant_entry_v1));
    P("flags.offset", offsetof(struct grant_entry_v1, flags));
    P("flags.size", sizeof(((struct grant_entry_v1 *)0)->flags));
    P("domid.offset", offsetof(struct grant_entry_v1, domid));
    P("domid.size", sizeof(((struct grant_entry_v1 *)0)->domid));
    P("frame.offset", offsetof(struct grant_entry_v1, frame));
    P("frame.size", sizeof(((struct grant_entry_v1 *)0)->frame));
    P("DOMID_FIRST_RESERVED", DOMID_FIRST_RESERVED);
    return 0;
}
"""


def test_entry_layout_and_flags_match_xens_header(tmp_path):
    (tmp_path / "p.c").write_text(C_PROBE)
    cc = subprocess.run(
        ["gcc", "-Wall", "-Werror", "-o", str(tmp_path / "p"), str(tmp_path / "p.c")], capture_output=True, text=True
    )
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(tmp_path / "p")], capture_output=True, text=True, check=True).stdout
    c = {k: int(v) for k, v in (line.split() for line in out.splitlines())}
    for name in ("GTF_invalid", "GTF_permit_access", "GTF_accept_transfer", "GTF_transitive", "GTF_type_mask",
                 "GTF_readonly", "GTF_reading", "GTF_writing", "GTF_sub_page"):
        assert getattr(gt, name) == c[name], name
    assert gt.ENTRY_SIZE == c["sizeof"]
    # the Struct "<HHI" puts flags at 0 (2 bytes), domid at 2 (2), frame at 4 (4)
    assert (
        c["flags.offset"],
        c["flags.size"],
        c["domid.offset"],
        c["domid.size"],
        c["frame.offset"],
        c["frame.size"],
    ) == (0, 2, 2, 2, 4, 4)
    raw = bytearray(8)
    gt.ENTRY.pack_into(raw, 0, 0x0102, 0x0304, 0x05060708)
    assert raw == bytes([0x02, 0x01, 0x04, 0x03, 0x08, 0x07, 0x06, 0x05])
    from xenblk_vhost.sim.hypercall import DOMID_FIRST_RESERVED

    assert DOMID_FIRST_RESERVED == c["DOMID_FIRST_RESERVED"]


@pytest.fixture
def tables():
    """A one-frame grant table and its active table, in shared memory, as both sides map them."""
    grants = mmap.mmap(-1, gt.grant_table_bytes(1), mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    active = mmap.mmap(-1, gt.active_table_bytes(1), mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    table = gt.SharedGrantTable(grants, buffer_address(grants), 1)
    act = gt.ActiveTable(active, buffer_address(active), table.nr_entries)
    yield table, act
    grants.close()
    active.close()


OK, GENERAL, BAD_REF = int(GrantStatus.OKAY), int(GrantStatus.GENERAL_ERROR), int(GrantStatus.BAD_GNTREF)


def test_guest_publishes_flags_last_and_xen_sets_in_use_flags_while_pinned(tables):
    table, act = tables
    assert table.nr_entries == PAGE_SIZE // 8
    table.grant(8, 0, 1234, readonly=False)
    assert table.entry(8) == (gt.GTF_permit_access, 0, 1234)
    assert table.pin(8, 0, True, act) == (OK, 1234)
    assert table.entry(8).flags == gt.GTF_permit_access | gt.GTF_reading | gt.GTF_writing
    assert table.pin(8, 0, False, act) == (OK, 1234)  # a second, read-only pin of the same entry
    assert not table.try_end_access(8)
    table.unpin(8, True, act)  # the writer goes: GTF_writing clears, GTF_reading stays
    assert table.entry(8).flags == gt.GTF_permit_access | gt.GTF_reading
    assert not table.try_end_access(8)
    table.unpin(8, False, act)
    assert table.entry(8).flags == gt.GTF_permit_access
    assert table.try_end_access(8)
    assert table.entry(8) == (0, 0, 1234)  # flags cleared, the rest left as Linux leaves it


def test_xen_refuses_what_xen_refuses(tables):
    table, act = tables
    table.grant(9, 0, 7, readonly=True)
    table.grant(10, 5, 7, readonly=False)  # granted to another domain
    assert table.pin(9, 0, True, act) == (GENERAL, 0)  # write-pin of a read-only grant
    assert table.entry(9).flags == gt.GTF_permit_access | gt.GTF_readonly  # untouched
    assert act.get(9) == (0, 0)  # no pin leaked
    assert table.pin(10, 0, False, act) == (GENERAL, 0)
    assert table.pin(11, 0, False, act) == (GENERAL, 0)  # never granted
    assert table.pin(table.nr_entries, 0, False, act) == (BAD_REF, 0)
    assert table.check_for_copy(9, 0, True, act) == (GENERAL, 0)  # copy into a read-only grant
    assert table.check_for_copy(9, 0, False, act) == (OK, 7)
    assert table.check_for_copy(10, 0, False, act) == (GENERAL, 0)
    assert table.check_for_copy(table.nr_entries + 5, 0, False, act) == (BAD_REF, 0)
    gt.ENTRY.pack_into(table._buf, 12 * 8, gt.GTF_transitive, 0, 7)  # v2-only type in a v1 table
    assert table.pin(12, 0, False, act) == (GENERAL, 0)
    gt.ENTRY.pack_into(table._buf, 13 * 8, gt.GTF_permit_access | gt.GTF_sub_page, 0, 7)
    assert table.pin(13, 0, False, act) == (GENERAL, 0)  # maps refuse sub-page grants


def test_a_pinned_entry_keeps_its_frame_even_if_the_guest_rewrites_it(tables):
    table, act = tables
    table.grant(20, 0, 100, readonly=False)
    assert table.pin(20, 0, False, act) == (OK, 100)
    gt.ENTRY.pack_into(table._buf, 20 * 8, 0, 0, 999)  # hostile guest wipes the entry while mapped
    assert table.pin(20, 0, False, act) == (OK, 100)  # Xen uses its active entry
    assert table.check_for_copy(20, 0, False, act) == (OK, 100)
    table.unpin(20, False, act)
    table.unpin(20, False, act)
    assert table.check_for_copy(20, 0, False, act) == (GENERAL, 0)


RACER = textwrap.dedent(
    """
    import mmap, os, sys
    from xenblk_vhost.sim import grant_table as gt
    from xenblk_vhost.xen._libc import buffer_address
    gfd, afd, rounds = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    g = mmap.mmap(gfd, gt.grant_table_bytes(1), mmap.MAP_SHARED)
    a = mmap.mmap(afd, gt.active_table_bytes(1), mmap.MAP_SHARED)
    table = gt.SharedGrantTable(g, buffer_address(g), 1)
    act = gt.ActiveTable(a, buffer_address(a), table.nr_entries)
    pinned = violations = attempts = 0
    while pinned < rounds and attempts < 100 * rounds:  # pins fail while the guest has it revoked
        attempts += 1
        status, frame = table.pin(8, 0, False, act)
        if status == 0:
            pinned += 1
            for _ in range(3):  # while we hold the pin, the entry must stay granted and marked in use
                flags = table.entry(8).flags
                if flags & (gt.GTF_permit_access | gt.GTF_reading) != gt.GTF_permit_access | gt.GTF_reading:
                    violations += 1
            table.unpin(8, False, act)
    print(pinned, violations)
    """
)


def test_guest_cannot_revoke_under_a_pin_across_processes():
    gfd = os.memfd_create("gt")
    afd = os.memfd_create("act")
    os.ftruncate(gfd, gt.grant_table_bytes(1))
    os.ftruncate(afd, gt.active_table_bytes(1))
    g = mmap.mmap(gfd, gt.grant_table_bytes(1), mmap.MAP_SHARED)
    table = gt.SharedGrantTable(g, buffer_address(g), 1)
    rounds = 2000
    table.grant(8, 0, 1, readonly=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", RACER, str(gfd), str(afd), str(rounds)],
        pass_fds=(gfd, afd),
        stdout=subprocess.PIPE,
        text=True,
    )
    revokes = refused = 0
    try:
        while proc.poll() is None:
            if table.try_end_access(8):
                revokes += 1
                table.grant(8, 0, 1, readonly=True)
            else:
                refused += 1
        out = proc.stdout.read().split()
    finally:
        proc.wait()
        proc.stdout.close()
        g.close()
        os.close(gfd)
        os.close(afd)
    pinned, violations = map(int, out)
    assert violations == 0, (pinned, violations, revokes, refused)
    assert pinned == rounds and revokes > 0, (pinned, violations, revokes, refused)  # both sides really ran
