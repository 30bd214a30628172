"""The gntdev adapter against the kernel's own header, compiled by gcc.

Every ioctl number and every size and offset the adapter builds is printed by
a C probe built against /usr/include/xen/gntdev.h (linux-libc-dev) and
/usr/include/xen/grant_table.h (libxen-dev) and must match exactly. Then the
bytes the adapter packs are read back by C code through those structs, and
statuses written by C code are read back by the adapter. No /dev/xen here,
so the device calls themselves are exercised against real kernel objects
that are not gntdev (memfd, /dev/null) to check the syscall plumbing.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xenblk_vhost.xen import gntdev as g
from xenblk_vhost.xen._libc import MAP_FIXED, FixedRegion, buffer_address
from xenblk_vhost.xen.interfaces import PAGE_SIZE, CopySegment, GrantMapError, GrantStatus

# The rig's raw gntalloc (scripts/xen-rig/dom0/gntalloc.py): the 'guest' side of its gntdev checks on real Xen.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts" / "xen-rig" / "dom0"))
import gntalloc  # noqa: E402  (from the path above)

C_PRELUDE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <xen/xen.h>
#include <xen/grant_table.h>
#include <xen/gntdev.h>
#include <xen/gntalloc.h>
#include <sys/mman.h>
#define P(name, value) printf("%s %lld\n", name, (long long)(value))
#define FIELD(type, member) \
    P(#type "." #member ".offset", offsetof(struct type, member)); \
    P(#type "." #member ".size", sizeof(((struct type *)0)->member))
"""


def build(tmp_path, name: str, body: str) -> str:
    src = tmp_path / f"{name}.c"
    exe = tmp_path / name
    src.write_text(C_PRELUDE + body)
    cc = subprocess.run(["gcc", "-Wall", "-Werror", "-O0", "-o", str(exe), str(src)], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    return str(exe)


def parse(out: str) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


# (C struct, ctypes class, [(C member designator, ctypes offset, ctypes size)])
def _nested(cls, path: str) -> tuple[int, int]:
    offset, size = 0, 0
    for part in path.split("."):
        desc = getattr(cls, part)
        offset += desc.offset
        size = desc.size
        cls = dict((f[0], f[1]) for f in cls._fields_)[part]
        if issubclass(cls, ctypes.Array):  # refs[1]: step into the element type
            cls = cls._type_
    return offset, size


LAYOUTS = {
    "ioctl_gntdev_grant_ref": (g.GntdevGrantRef, ["domid", "ref"]),
    "ioctl_gntdev_map_grant_ref": (
        g.GntdevMapGrantRef,
        ["count", "pad", "index", "refs", "refs[0].domid", "refs[0].ref"],
    ),
    "ioctl_gntdev_unmap_grant_ref": (g.GntdevUnmapGrantRef, ["index", "count", "pad"]),
    "ioctl_gntdev_set_max_grants": (g.GntdevSetMaxGrants, ["count"]),
    "ioctl_gntdev_unmap_notify": (g.GntdevUnmapNotify, ["index", "action", "event_channel_port"]),
    "gntdev_grant_copy_segment": (
        g.GntdevGrantCopySegment,
        [
            "source",
            "source.virt",
            "source.foreign.ref",
            "source.foreign.offset",
            "source.foreign.domid",
            "dest",
            "dest.virt",
            "dest.foreign.ref",
            "dest.foreign.offset",
            "dest.foreign.domid",
            "len",
            "flags",
            "status",
        ],
    ),
    "ioctl_gntdev_grant_copy": (g.GntdevGrantCopy, ["count", "segments"]),
    # gntalloc is only used by the rig's adapters scenario (scripts/xen-rig/dom0/gntalloc.py)
    "ioctl_gntalloc_alloc_gref": (gntalloc.GntallocAllocGrefHeader, ["domid", "flags", "count", "index"]),
    "ioctl_gntalloc_dealloc_gref": (gntalloc.GntallocDeallocGref, ["index", "count"]),
}

HEADER_CONSTANTS = {
    "MAP_FIXED": MAP_FIXED,
    "IOCTL_GNTDEV_MAP_GRANT_REF": g.IOCTL_GNTDEV_MAP_GRANT_REF,
    "IOCTL_GNTDEV_UNMAP_GRANT_REF": g.IOCTL_GNTDEV_UNMAP_GRANT_REF,
    "IOCTL_GNTDEV_SET_MAX_GRANTS": g.IOCTL_GNTDEV_SET_MAX_GRANTS,
    "IOCTL_GNTDEV_SET_UNMAP_NOTIFY": g.IOCTL_GNTDEV_SET_UNMAP_NOTIFY,
    "IOCTL_GNTDEV_GRANT_COPY": g.IOCTL_GNTDEV_GRANT_COPY,
    "UNMAP_NOTIFY_CLEAR_BYTE": g.UNMAP_NOTIFY_CLEAR_BYTE,
    "UNMAP_NOTIFY_SEND_EVENT": g.UNMAP_NOTIFY_SEND_EVENT,
    "GNTCOPY_source_gref": g.GNTCOPY_SOURCE_GREF,
    "GNTCOPY_dest_gref": g.GNTCOPY_DEST_GREF,
    "IOCTL_GNTALLOC_ALLOC_GREF": gntalloc.IOCTL_GNTALLOC_ALLOC_GREF,
    "IOCTL_GNTALLOC_DEALLOC_GREF": gntalloc.IOCTL_GNTALLOC_DEALLOC_GREF,
    "GNTALLOC_FLAG_WRITABLE": gntalloc.GNTALLOC_FLAG_WRITABLE,
}

GNTST = {f"GNTST_{s.name.lower()}": int(s) for s in GrantStatus}


def _ctype_path(member: str) -> str:
    return member.replace("[0]", "")


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict[str, int]:
    lines = []
    for name in HEADER_CONSTANTS:
        lines.append(f'P("{name}", {name});')
    for name in GNTST:
        lines.append(f'P("{name}", {name});')
    lines.append("FIELD(ioctl_gntalloc_alloc_gref, gref_ids);")
    for struct_name, (_, members) in LAYOUTS.items():
        lines.append(f'P("{struct_name}.sizeof", sizeof(struct {struct_name}));')
        for m in members:
            lines.append(f"FIELD({struct_name}, {m});")
    exe = build(tmp_path_factory.mktemp("gntdev"), "probe", "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n")
    return parse(subprocess.run([exe], check=True, capture_output=True, text=True).stdout)


def test_ioctl_numbers_and_flags_match_the_kernel_header(probe):
    for name, value in HEADER_CONSTANTS.items():
        assert value == probe[name], name


def test_grant_status_codes_match_xens_header(probe):
    assert len(GNTST) == 14
    for name, value in GNTST.items():
        assert value == probe[name], name


@pytest.mark.parametrize("struct_name", sorted(LAYOUTS))
def test_struct_layouts_match_the_kernel_header(probe, struct_name):
    cls, members = LAYOUTS[struct_name]
    if struct_name == "ioctl_gntalloc_alloc_gref":
        # our class stops before the variable gref_ids[] tail, which starts right after it
        assert ctypes.sizeof(cls) == probe["ioctl_gntalloc_alloc_gref.gref_ids.offset"]
    else:
        assert ctypes.sizeof(cls) == probe[f"{struct_name}.sizeof"]
    for m in members:
        off, size = _nested(cls, _ctype_path(m))
        assert (off, size) == (probe[f"{struct_name}.{m}.offset"], probe[f"{struct_name}.{m}.size"]), m
    if struct_name == "ioctl_gntdev_map_grant_ref":
        assert g.MAP_HEADER_SIZE == probe["ioctl_gntdev_map_grant_ref.refs.offset"]


# ---- what the adapter packs, read by C through the kernel's structs ----

MAP_DECODER = r"""
int main(int argc, char **argv) {
    static unsigned char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf, stdin);
    struct ioctl_gntdev_map_grant_ref *op = (void *)buf;
    if (n < sizeof(*op) - sizeof(op->refs) + op->count * sizeof(op->refs[0])) return 2;
    printf("%u\n", op->count);
    for (unsigned i = 0; i < op->count; i++) printf("%u %u\n", op->refs[i].domid, op->refs[i].ref);
    /* and the kernel's answer, for decode_map_index */
    op->index = strtoull(argv[1], NULL, 0);
    fwrite(buf, 1, n, stderr);
    return 0;
}
"""


def test_map_request_is_what_the_kernel_reads(tmp_path):
    exe = build(tmp_path, "mapdec", MAP_DECODER)
    refs = [8, 9, 511, 0xFFFFFFF0]
    req = g.encode_map_request(7, refs)
    out = subprocess.run([exe, "0x7f000"], input=bytes(req), capture_output=True, check=True)
    lines = out.stdout.decode().split("\n")
    assert int(lines[0]) == len(refs)
    assert [tuple(map(int, line.split())) for line in lines[1 : 1 + len(refs)]] == [(7, r) for r in refs]
    answered = ctypes.create_string_buffer(out.stderr, len(out.stderr))
    assert g.decode_map_index(answered) == 0x7F000


COPY_DECODER = r"""
int main(int argc, char **argv) {
    static struct gntdev_grant_copy_segment segs[256];
    size_t n = fread(segs, sizeof segs[0], 256, stdin);
    for (size_t i = 0; i < n; i++) {
        struct gntdev_grant_copy_segment *s = &segs[i];
        printf("%u %u ", s->flags, s->len);
        if (s->flags & GNTCOPY_source_gref)
            printf("G %u %u %u ", s->source.foreign.ref, s->source.foreign.offset, s->source.foreign.domid);
        else
            printf("V %llu ", (unsigned long long)(uintptr_t)s->source.virt);
        if (s->flags & GNTCOPY_dest_gref)
            printf("G %u %u %u\n", s->dest.foreign.ref, s->dest.foreign.offset, s->dest.foreign.domid);
        else
            printf("V %llu\n", (unsigned long long)(uintptr_t)s->dest.virt);
        s->status = -(int16_t)(i + 1);  /* what Xen would answer, distinct per segment */
    }
    fwrite(segs, sizeof segs[0], n, stderr);
    return 0;
}
"""


def test_copy_batch_is_what_the_kernel_reads_and_statuses_come_back_in_order(tmp_path):
    exe = build(tmp_path, "copydec", COPY_DECODER)
    segments = [
        CopySegment(to_guest=True, domid=3, gref=100, guest_offset=0, local_addr=0x7F0000001000, length=4096),
        CopySegment(to_guest=False, domid=3, gref=101, guest_offset=512, local_addr=0x7F0000002200, length=1024),
        # crosses its page: the kernel would fail the whole ioctl, so it is answered locally
        CopySegment(to_guest=False, domid=3, gref=102, guest_offset=4000, local_addr=0x7F0000003000, length=512),
        CopySegment(
            to_guest=True, domid=0x7FEF, gref=0xFFFFFFFF, guest_offset=4095, local_addr=0xFFFFFFFFFFFF, length=1
        ),
    ]
    batch = g.CopyBatch(capacity=2)  # forces a grow
    count, refused = batch.load(segments)
    assert count == 3 and refused == {2: GrantStatus.BAD_COPY_ARG}
    raw = bytes(batch.buffer)[: count * g.SEGMENT_SIZE]
    out = subprocess.run([exe], input=raw, capture_output=True, check=True)
    seen = [line.split() for line in out.stdout.decode().splitlines()]
    expected = []
    for s in (segments[0], segments[1], segments[3]):
        foreign = ["G", str(s.gref), str(s.guest_offset), str(s.domid)]
        local = ["V", str(s.local_addr)]
        if s.to_guest:
            expected.append([str(g.GNTCOPY_DEST_GREF), str(s.length)] + local + foreign)
        else:
            expected.append([str(g.GNTCOPY_SOURCE_GREF), str(s.length)] + foreign + local)
    assert seen == expected
    ctypes.memmove(batch.address, out.stderr, len(out.stderr))
    assert batch.statuses(count, refused, len(segments)) == [-1, -2, GrantStatus.BAD_COPY_ARG, -3]


def test_copy_batch_reuse_does_not_leak_old_statuses():
    batch = g.CopyBatch(capacity=4)
    segs = [CopySegment(True, 1, i, 0, 0x1000, 8) for i in range(4)]
    count, refused = batch.load(segs)
    ctypes.memset(batch.address, 0xFF, count * g.SEGMENT_SIZE)  # garbage, as if from a previous batch
    count, refused = batch.load(segs[:2])
    assert batch.statuses(count, refused, 2) == [0, 0]


# ---- the syscall plumbing, against real kernel objects ----


def test_fixed_region_places_shared_pages_and_respects_readonly():
    fd = os.memfd_create("frames")
    try:
        os.ftruncate(fd, 4 * PAGE_SIZE)
        os.pwrite(fd, b"A" * PAGE_SIZE + b"B" * PAGE_SIZE + b"C" * PAGE_SIZE, 0)
        rw = FixedRegion(2 * PAGE_SIZE, readonly=False)
        rw.place(0, PAGE_SIZE, fd, 2 * PAGE_SIZE)  # frame 2 first
        rw.place(PAGE_SIZE, PAGE_SIZE, fd, 0)  # then frame 0
        view = rw.view()
        assert bytes(view[:4]) == b"CCCC" and bytes(view[PAGE_SIZE : PAGE_SIZE + 4]) == b"AAAA"
        view[PAGE_SIZE] = ord("z")
        assert os.pread(fd, 1, 0) == b"z"  # shared with the file, not a private copy
        with pytest.raises(BufferError):
            rw.close()  # a live view pins the mapping
        view.release()
        rw.close()
        ro = FixedRegion(PAGE_SIZE, readonly=True)
        ro.place(0, PAGE_SIZE, fd, PAGE_SIZE)
        rview = ro.view()
        assert rview.readonly and bytes(rview[:2]) == b"BB"
        assert buffer_address(rview) == ro.addr
        rview.release()
        ro.close()
    finally:
        os.close(fd)


def test_fixed_region_refills_the_hole_when_the_kernel_refuses_a_piece():
    wfd = os.open("/dev/null", os.O_WRONLY)  # mmap needs a readable fd: EACCES
    try:
        region = FixedRegion(2 * PAGE_SIZE, readonly=False)
        with pytest.raises(OSError) as e:
            region.place(0, PAGE_SIZE, wfd, 0)
        assert e.value.errno in (errno.EACCES, errno.ENODEV)
        view = region.view()
        view[0] = 1  # still our own anonymous memory, not a hole
        assert view[0] == 1
        view.release()
        region.close()
    finally:
        os.close(wfd)


def test_device_calls_report_kernel_errors_and_tolerate_enotty_for_max_grants(tmp_path):
    # /dev/null answers every ioctl with ENOTTY, as a kernel without SET_MAX_GRANTS does.
    dev = g.GntdevDevice("/dev/null")
    try:
        dev.set_max_grants(128)  # tolerated, like libxengnttab
        with pytest.raises(GrantMapError) as e:
            dev.map_grants(1, [8], readonly=True)
        assert e.value.errno == errno.ENOTTY
        with pytest.raises(OSError) as e:
            dev.grant_copy([CopySegment(True, 1, 8, 0, 0x1000, 16)])
        assert e.value.errno == errno.ENOTTY
        # a batch whose every segment is refused locally never reaches the kernel
        assert dev.grant_copy([CopySegment(True, 1, 8, 4090, 0x1000, 16)]) == [GrantStatus.BAD_COPY_ARG]
        assert dev.grant_copy([]) == []
    finally:
        dev.close()
    dev.close()
    with pytest.raises(FileNotFoundError):
        g.GntdevDevice(str(tmp_path / "no-such-gntdev"))



def test_real_adapters_offer_every_member_of_the_shared_protocols():
    from xenblk_vhost.xen import evtchn
    from xenblk_vhost.xen.interfaces import EventChannel, Evtchn, Gntdev, GrantMapping

    for proto, cls in [
        (Gntdev, g.GntdevDevice),
        (GrantMapping, g.GntdevMapping),
        (Evtchn, evtchn.EvtchnDevice),
        (EventChannel, evtchn.EvtchnPort),
    ]:
        members = {n for n in vars(proto) if not n.startswith("_")}
        assert members and members <= set(dir(cls)), (cls, members - set(dir(cls)))
