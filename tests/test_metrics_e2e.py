"""`xenblk-vhost run --sim --metrics 127.0.0.1:0`: scraped over HTTP on loopback, parsed by
prometheus_client's own parser, and equal to what the control socket says at the same moment."""

from __future__ import annotations

import re
import signal
import sys

import trio
from prometheus_client.parser import text_string_to_metric_families

from e2e_support.fixtures import disk_image, write_config
from e2e_support.frontend_agent import frontend_agent
from xenblk_vhost.control_protocol import request_control
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world


def run_argv(world, config, *extra) -> list[str]:
    argv = [sys.executable, "-m", "xenblk_vhost", "run", str(config), "--xenstore", world.xenstore_path,
            "--sim", world.hypervisor_path, *extra]
    return ["sh", "-c", 'exec "$@" 2>&1', "sh", *argv]


async def http_get(port: int, target: str, method: str = "GET") -> tuple[str, dict, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *header_lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return status, headers, body


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_scraped_over_http_match_the_control_sockets_stats(tmp_path):
    img = disk_image(tmp_path)
    cfg = write_config(tmp_path, "scraped", [f"vdev: xvda, driver: io_uring, path: {img}, queues: 2"])
    control = tmp_path / "control.sock"
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("scraped")
        backend = await world.start_process(
            run_argv(world, cfg, "--control", str(control), "--metrics", "127.0.0.1:0"), name="backend")
        line = await backend.wait_line(lambda line: "metrics: http://127.0.0.1:" in line, 10)
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/metrics", line).group(1))
        vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img)))
        async with frontend_agent(world, guest.domid, vbd.devid, max_queues=2) as fe:
            await fe.call("connect")
            load = (await fe.call("workloads", devs=[vbd.devid], requests=200, depth=8, timeout=120))
            assert load[str(vbd.devid)]["ok"]
            await fe.call("write", sector=0, sectors=8, seed=3)  # and one we know for sure

            # The guest is idle now: both views are of the same counts.
            stats = request_control(str(control), "stats")
            status, headers, body = await http_get(port, "/metrics")
            assert status == "HTTP/1.1 200 OK"
            assert headers["content-type"].startswith("text/plain; version=0.0.4")
            got = samples(body.decode())
            [entry] = [v for v in stats["vbds"] if v["devid"] == vbd.devid]
            who = {"domain": "scraped", "domid": str(guest.domid), "devid": str(vbd.devid), "vdev": "xvda"}
            assert got[("xenblk_vbd_connected", tuple(sorted(who.items())))] == 1
            assert got[("xenblk_vbd_rings", tuple(sorted(who.items())))] == 2
            info = dict(who, kind="vbd", driver="io_uring", path=str(img), data_path="copy")
            assert got[("xenblk_vbd_info", tuple(sorted(info.items())))] == 1
            assert got[("process_open_fds", ())] > 0
            checked = 0
            for index, ring in enumerate(entry["rings"]):
                labels = dict(who, ring=str(index))

                def value(name: str, labels=labels, **extra) -> float:
                    return got[(name, tuple(sorted(dict(labels, **extra).items())))]

                for op, key in (("read", "rd_req"), ("write", "wr_req"), ("flush", "f_req"), ("discard", "ds_req")):
                    assert value("xenblk_vbd_requests_total", op=op) == ring[key]
                assert value("xenblk_vbd_bytes_total", op="read") == ring["rd_sect"] * 512
                assert value("xenblk_vbd_bytes_total", op="write") == ring["wr_sect"] * 512
                assert value("xenblk_vbd_out_of_requests_total") == ring["oo_req"]
                assert value("xenblk_vbd_errors_total") == ring["errors"] == 0
                assert value("xenblk_vbd_requests_in_flight") == ring["in_flight"] == 0
                assert value("xenblk_vbd_persistent_grants") == ring["persistent_grants"]
                assert value("xenblk_vbd_ring_halted") == 0
                checked += ring["rd_req"] + ring["wr_req"]
            assert checked == entry["total"]["rd_req"] + entry["total"]["wr_req"] > 200
            # Every request the rings answered has its latency in the vbd's histogram.
            vbd_labels = tuple(sorted(who.items()))
            total = entry["total"]
            answered = total["rd_req"] + total["wr_req"] + total["f_req"] + total["ds_req"]
            assert got[("xenblk_vbd_request_latency_seconds_count", vbd_labels)] == answered
            assert (
                got[("xenblk_vbd_request_latency_seconds_bucket", tuple(sorted(dict(who, le="+Inf").items())))]
                == answered
            )
            assert got[("xenblk_vbd_request_latency_seconds_sum", vbd_labels)] > 0

            # HEAD has the headers and no body; other paths and methods are refused.
            status, headers, body = await http_get(port, "/metrics", "HEAD")
            assert status == "HTTP/1.1 200 OK" and int(headers["content-length"]) > 0 and body == b""
            assert (await http_get(port, "/nope"))[0] == "HTTP/1.1 404 Not Found"
            assert (await http_get(port, "/metrics", "POST"))[0] == "HTTP/1.1 405 Method Not Allowed"
            assert (await fe.call("close"))["errors"] == []
        backend.proc.send_signal(signal.SIGTERM)
        assert await backend.wait(30) == 0
        # Nothing listens after exit.
        try:
            await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            pass
        else:
            raise AssertionError(f"port {port} still answers after the daemon exited")


async def test_run_refuses_a_metrics_address_it_cannot_bind(tmp_path):
    img = disk_image(tmp_path)
    cfg = write_config(tmp_path, "busy", [f"vdev: xvda, driver: io_uring, path: {img}"])
    async with open_world(tmp_path / "w") as world:
        taken = trio.socket.socket()
        with taken:
            await taken.bind(("127.0.0.1", 0))
            taken.listen(1)
            port = taken.getsockname()[1]
            backend = await world.start_process(
                run_argv(world, cfg, "--control", "none", "--metrics", f"127.0.0.1:{port}"), name="backend",
                ready=None)
            assert await backend.wait(30) == 1
        assert any(f"stopped: --metrics 127.0.0.1:{port}:" in line and "in use" in line for line in backend.lines), \
            backend.lines
