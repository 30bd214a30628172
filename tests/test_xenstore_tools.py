"""Debian's xenstore-utils (Xen 4.17 libxenstore) as clients of the simulated xenstored.

The binaries find the daemon through XENSTORED_PATH. Outputs are compared
byte for byte with what xenstore_client.c prints for real xenstored.
"""

import os
import subprocess

import trio

from xenblk_vhost.xen.interfaces import Permission

N0 = Permission(0, False, False)


async def tool(server, *argv):
    """Run one xenstore-* binary against the server; return (status, stdout, stderr) as text."""
    env = dict(os.environ, XENSTORED_PATH=server.socket_path)
    with trio.fail_after(20):  # a hung tool is a failure, not a stuck suite
        done = await trio.run_process(list(argv), env=env, capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_write_then_read(xenstored, xs):
    assert await tool(xenstored, "xenstore-write", "/vm/name", "guest1", "/vm/uuid", "u-1") == (0, "", "")
    assert await xs.read("/vm/name") == b"guest1"
    assert await tool(xenstored, "xenstore-read", "/vm/name", "/vm/uuid") == (0, "guest1\nu-1\n", "")
    assert await tool(xenstored, "xenstore-read", "-p", "/vm/name") == (0, "/vm/name: guest1\n", "")


async def test_values_are_escaped_both_ways(xenstored, xs):
    await xs.write("/v/raw", b"a\nb\\c\x01\x7f")
    assert await tool(xenstored, "xenstore-read", "/v/raw") == (0, "a\\nb\\\\c\\001\\x7f\n", "")
    assert await tool(xenstored, "xenstore-read", "-R", "/v/raw") == (0, "a\nb\\c\x01\x7f", "")
    assert (await tool(xenstored, "xenstore-write", "/v/in", "x\\ty\\x41"))[0] == 0
    assert await xs.read("/v/in") == b"x\tyA"


async def test_read_missing_fails(xenstored):
    assert await tool(xenstored, "xenstore-read", "/missing") == (
        1, "", "xenstore-read: couldn't read path /missing\n")


async def test_ls_tree_and_perms(xenstored, xs):
    # A fresh xenstored holds /tool/xenstored, nothing else.
    assert await tool(xenstored, "xenstore-ls") == (0, 'tool = ""\n xenstored = ""\n', "")
    await xs.write("/d/backend/state", "4")
    await xs.write("/d/name", "disk")
    await xs.set_perms("/d/name", [N0, Permission(5, True, False)])
    assert await tool(xenstored, "xenstore-ls", "/d") == (
        0, 'backend = ""\n state = "4"\nname = "disk"\n', "")
    assert await tool(xenstored, "xenstore-ls", "-f", "/d") == (
        0, '/d/backend = ""\n/d/backend/state = "4"\n/d/name = "disk"\n', "")
    # -p pads to column 60 with ". " then shows the permission list.
    status, out, _ = await tool(xenstored, "xenstore-ls", "-p", "/d")
    lines = out.splitlines()
    assert status == 0 and len(lines) == 3
    assert lines[0].startswith('backend = ""') and lines[0].endswith("  (n0)")
    assert lines[2].startswith('name = "disk"') and lines[2].endswith("  (n0,r5)")
    assert len(lines[2]) == 60 + len("  (n0,r5)")
    assert await tool(xenstored, "xenstore-ls", "-f", "-p", "/d/backend") == (0, '/d/backend/state = "4"   (n0)\n', "")


async def test_list(xenstored, xs):
    for name in ("b", "a", "c"):
        await xs.write(f"/l/{name}", "")
    assert await tool(xenstored, "xenstore-list", "/l") == (0, "b\na\nc\n", "")  # creation order
    assert await tool(xenstored, "xenstore-list", "-p", "/l") == (0, "/l/b\n/l/a\n/l/c\n", "")
    assert await tool(xenstored, "xenstore-list", "/nothing") == (
        1,
        "",
        "xenstore-list: could not list path /nothing\n",
    )


async def test_exists(xenstored, xs):
    await xs.write("/e", "")
    assert (await tool(xenstored, "xenstore-exists", "/e"))[0] == 0
    assert (await tool(xenstored, "xenstore-exists", "/e/not"))[0] == 1


async def test_rm_subtree_and_tidy(xenstored, xs):
    await xs.write("/r/a/b/c", "1")
    await xs.write("/r/keep", "1")
    assert await tool(xenstored, "xenstore-rm", "/r/a") == (0, "", "")
    assert await xs.directory("/r") == ["keep"]
    # -t also removes parents left empty and without a value.
    await xs.write("/t/x/y/z", "1")
    assert await tool(xenstored, "xenstore-rm", "-t", "/t/x/y/z") == (0, "", "")
    assert not await xs.exists("/t")
    assert await tool(xenstored, "xenstore-rm", "/nope/deeper") == (
        1,
        "",
        "xenstore-rm: could not remove path /nope/deeper\n",
    )


async def test_chmod(xenstored, xs):
    await xs.write("/c/dev/state", "1")
    assert await tool(xenstored, "xenstore-chmod", "/c/dev", "n0", "r5", "b7") == (0, "", "")
    assert await xs.get_perms("/c/dev") == [N0, Permission(5, True, False), Permission(7, True, True)]
    assert await xs.get_perms("/c/dev/state") == [N0]
    assert (await tool(xenstored, "xenstore-chmod", "-r", "/c", "w3"))[0] == 0
    for path in ("/c", "/c/dev", "/c/dev/state"):
        assert await xs.get_perms(path) == [Permission(3, False, True)]


async def test_xenstore_watch_sees_our_write(xenstored, xs):
    env = dict(os.environ, XENSTORED_PATH=xenstored.socket_path)
    await xs.mkdir("/w")
    proc = await trio.lowlevel.open_process(["xenstore-watch", "-n", "3", "/w"], env=env, stdout=subprocess.PIPE)
    try:
        with trio.fail_after(20):
            lines = _lines(proc.stdout)
            assert await lines.__anext__() == "/w"  # registration fire
            await xs.write("/w/state", "1")
            assert await lines.__anext__() == "/w/state"
            await xs.write("/elsewhere", "1")  # not below /w: no event
            await xs.rm("/w")
            assert await lines.__anext__() == "/w"
            assert await proc.wait() == 0  # -n 3: exits after the third event
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proc.stdout.aclose()


async def _lines(stream):
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = await stream.receive_some(4096)
            assert chunk, f"stream ended, partial {buf!r}"
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        yield line.decode()


async def test_our_watch_sees_xenstore_write(xenstored, xs):
    async with xs.watch("/fe") as events:
        assert await events.__anext__() == "/fe"
        assert (await tool(xenstored, "xenstore-write", "/fe/device/state", "3"))[0] == 0
        assert await events.__anext__() == "/fe/device/state"
        assert (await tool(xenstored, "xenstore-rm", "/fe/device"))[0] == 0
        # The removed child fires only watches on itself; a watch above sees the removed root.
        assert await events.__anext__() == "/fe/device"
        assert (await tool(xenstored, "xenstore-write", "/fe/next", "1"))[0] == 0
        assert await events.__anext__() == "/fe/next"


async def test_long_listing_uses_directory_part(xenstored, xs):
    # 400 names of 12 bytes need more than one 4096-byte reply: DIRECTORY says
    # E2BIG and libxenstore (like our client) pages with DIRECTORY_PART.
    names = [f"child{n:07d}" for n in range(400)]
    async with trio.open_nursery() as nursery:
        for name in names:
            nursery.start_soon(xs.mkdir, f"/big/{name}")
    listed = (await xs.directory("/big"))
    assert sorted(listed) == names
    status, out, err = await tool(xenstored, "xenstore-list", "/big")
    assert (status, err) == (0, "") and out.splitlines() == listed
