"""GrantPool follows blkif_completion's rule, on a real simulated grant table.

The guest (sim Guest) grants; the "backend" is the simulated gntdev of this
process mapping those grants, which sets GTF_reading/GTF_writing in the
guest's entries exactly as a backend's map would.
"""

import pytest

from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE
from xenblk_vhost.sim import open_sim
from xenblk_vhost.sim.blkfront_grants import GrantPool, GrantStillMapped
from xenblk_vhost.sim.blkfront_ring import IoRequest
from xenblk_vhost.sim.grant_table import GTF_readonly
from xenblk_vhost.sim.guest import Guest
from xenblk_vhost.sim.hypervisor import hypervisor_process
from xenblk_vhost.xen.interfaces import GrantMapError


@pytest.fixture
async def sim(tmp_path):
    path = str(tmp_path / "hv.sock")
    async with hypervisor_process(path):
        guest = Guest.create(path, pages=64, grant_frames=1)
        platform = open_sim(path)
        try:
            yield guest, platform
        finally:
            platform.close()
            guest.close()


async def test_without_persistence_every_use_is_a_fresh_grant(sim):
    guest, platform = sim
    pool = GrantPool(guest, 0, persistent=False, limit=4)
    page = pool.get(readonly=True)  # write data: the backend only reads it
    assert guest.grant_entry(page.gref).flags & GTF_readonly
    with pytest.raises(GrantMapError):
        platform.gntdev.map_grants(guest.domid, [page.gref], readonly=False)
    first = page.gref
    pool.put(page)  # nobody maps it: revoked
    assert page.gref is None
    again = pool.get(readonly=False)
    assert again is page and not guest.grant_entry(again.gref).flags & GTF_readonly
    assert pool.grants_issued == 2 and pool.created == 1 and first is not None


async def test_without_persistence_a_grant_still_mapped_is_a_backend_bug(sim):
    guest, platform = sim
    pool = GrantPool(guest, 0, persistent=False, limit=4)
    page = pool.get(readonly=False)
    mapping = platform.gntdev.map_grants(guest.domid, [page.gref], readonly=False)
    with pytest.raises(GrantStillMapped, match=f"backend has not unmapped grant {page.gref}"):
        pool.put(page)
    mapping.close()


async def test_with_persistence_mapped_grants_are_kept_and_reused_first(sim):
    guest, platform = sim
    pool = GrantPool(guest, 0, persistent=True, limit=4)
    kept, dropped = pool.get(readonly=True), pool.get(readonly=True)
    # Persistent grants are read-write whatever the first use (they are reused for reads).
    assert not guest.grant_entry(kept.gref).flags & GTF_readonly
    mapping = platform.gntdev.map_grants(guest.domid, [kept.gref], readonly=False)
    pool.put(dropped)  # unmapped by the backend: revoked, goes to the tail
    pool.put(kept)  # still mapped: kept, goes to the head
    assert (kept.gref is not None, dropped.gref, pool.persistent_count) == (True, None, 1)
    issued = pool.grants_issued
    assert pool.get(readonly=True) is kept and pool.grants_issued == issued  # no new grant
    pool.put(kept)
    # Teardown while the backend still maps it: reported, not reused.
    errors = pool.release_all()
    assert [e.gref for e in errors] == [kept.gref]
    mapping.close()
    assert guest.end_access(kept.gref)


async def test_the_pool_never_grows_past_its_bound(sim):
    guest, _ = sim
    pool = GrantPool(guest, 0, persistent=False, limit=2)
    pool.get(readonly=True)
    pool.get(readonly=True)
    with pytest.raises(RuntimeError, match="exhausted"):
        pool.get(readonly=True)


@pytest.mark.parametrize("first_sect, nr, segments", [
    (0, 8, [(0, 7)]),
    (3, 1, [(3, 3)]),
    (3, 20, [(3, 7), (0, 7), (0, 6)]),
    (7, 2, [(7, 7), (0, 0)]),
    (0, 0, []),
])
def test_segments_cover_the_sectors_page_by_page(first_sect, nr, segments):
    assert IoRequest(OP_READ, 0, nr, first_sect=first_sect).segments() == segments
    assert IoRequest(OP_WRITE, 0, nr, bytes(nr * 512), first_sect).segments() == segments
