"""The Prometheus side in process: address parsing, the collector (latency histograms included), HTTP replies."""

from __future__ import annotations

import gc
import os
import socket
import struct

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from xenblk_vhost.backend.datapath.stats import RingStats
from xenblk_vhost.observability.metrics import (
    MAX_CLIENTS,
    MetricsAddressError,
    cumulative_buckets,
    http_reply,
    merged_latency,
    metrics_registry,
    open_metrics_listeners,
    parse_listen_address,
    serve_metrics,
)


@pytest.mark.parametrize("text, parsed", [
    ("127.0.0.1:9477", ("127.0.0.1", 9477)),
    ("localhost:0", ("localhost", 0)),
    ("[::1]:9477", ("::1", 9477)),
])
def test_addresses(text, parsed):
    assert parse_listen_address(text) == parsed


@pytest.mark.parametrize("text", ["9477", ":9477", "host:", "host:99999", "::1:9477", "[nope]:1", "h:x"])
def test_bad_addresses_are_refused(text):
    with pytest.raises(MetricsAddressError):
        parse_listen_address(text)


def _latency(counts, total_s):
    return {"bounds": [0.001, 0.01], "counts": counts, "sum": total_s}


def test_ring_latencies_add_up_into_cumulative_buckets():
    merged = merged_latency([{"latency": _latency([1, 2, 3], 0.5)}, {}, {"latency": _latency([4, 0, 1], 0.25)}])
    assert merged == {"bounds": [0.001, 0.01], "counts": [5, 2, 4], "sum": 0.75}
    assert cumulative_buckets(merged) == [("0.001", 5), ("0.01", 7), ("+Inf", 11)]
    assert merged_latency([{}, {}]) is None


def _snapshot(with_latency: bool) -> dict:
    ring = RingStats()
    ring.rd_req, ring.rd_sect, ring.wr_req, ring.wr_sect, ring.f_req, ring.oo_req = 3, 24, 2, 16, 1, 4
    ring.engine_syscalls, ring.engine_sleeps = 30, 5
    ring.copy_segs_mapped, ring.copy_segs_xen = 40, 3
    snap = ring.snapshot()
    if with_latency:
        snap["latency"] = _latency([2, 3, 1], 0.042)
    else:  # a snapshot from a datapath that measures no latency
        del snap["latency"]
    return {"vbds": [{"domain": "web1", "domid": 5, "devid": 51712, "vdev": "xvda", "serving": True, "kind": "vbd",
                      "driver": "io_uring", "path": "/srv/web1.img", "data_path": "copy", "state": "CONNECTED",
                      "paused": True, "rings": [snap]}]}


def _scrape(snapshot: dict) -> dict:
    reply = http_reply(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", metrics_registry(lambda: snapshot))
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"text/plain; version=0.0.4" in head
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def test_collector_reads_the_snapshot_at_scrape_time():
    got = _scrape(_snapshot(with_latency=True))
    ring = (("devid", "51712"), ("domain", "web1"), ("domid", "5"), ("ring", "0"), ("vdev", "xvda"))
    vbd = (("devid", "51712"), ("domain", "web1"), ("domid", "5"), ("vdev", "xvda"))
    assert got[("xenblk_vbd_requests_total", tuple(sorted(ring + (("op", "read"),))))] == 3
    assert got[("xenblk_vbd_requests_total", tuple(sorted(ring + (("op", "flush"),))))] == 1
    assert got[("xenblk_vbd_bytes_total", tuple(sorted(ring + (("op", "write"),))))] == 16 * 512
    assert got[("xenblk_vbd_out_of_requests_total", ring)] == 4
    assert got[("xenblk_vbd_engine_syscalls_total", tuple(sorted(ring + (("kind", "all"),))))] == 30
    assert got[("xenblk_vbd_engine_syscalls_total", tuple(sorted(ring + (("kind", "sleep"),))))] == 5
    assert got[("xenblk_vbd_engine_copy_segments_total", tuple(sorted(ring + (("how", "mapped"),))))] == 40
    assert got[("xenblk_vbd_engine_copy_segments_total", tuple(sorted(ring + (("how", "xen"),))))] == 3
    assert got[("xenblk_vbd_connected", vbd)] == 1
    assert got[("xenblk_vbd_request_latency_seconds_bucket", tuple(sorted(vbd + (("le", "0.01"),))))] == 5
    assert got[("xenblk_vbd_request_latency_seconds_bucket", tuple(sorted(vbd + (("le", "+Inf"),))))] == 6
    assert got[("xenblk_vbd_request_latency_seconds_count", vbd)] == 6
    assert got[("xenblk_vbd_request_latency_seconds_sum", vbd)] == pytest.approx(0.042)
    # What serves the vbd, named by the domain's name (the YAML's key), and its state.
    info = tuple(sorted(vbd + (("kind", "vbd"), ("driver", "io_uring"), ("path", "/srv/web1.img"),
                               ("data_path", "copy"))))
    assert got[("xenblk_vbd_info", info)] == 1
    assert got[("xenblk_vbd_paused", vbd)] == 1 and got[("xenblk_vbd_state", vbd)] == 4
    # The process' own figures.
    assert got[("process_open_fds", ())] > 0 and got[("process_resident_memory_bytes", ())] > 0
    assert ("process_cpu_seconds_total", ()) in got and ("process_start_time_seconds", ()) in got


def test_no_latency_histogram_without_measurements():
    got = _scrape(_snapshot(with_latency=False))
    assert not any(name.startswith("xenblk_vbd_request_latency") for name, _ in got)
    assert got[("xenblk_vbd_rings", (("devid", "51712"), ("domain", "web1"), ("domid", "5"), ("vdev", "xvda")))] == 1


def test_openmetrics_when_the_scraper_asks_for_it():
    reply = http_reply(b"GET /metrics HTTP/1.1\r\nAccept: application/openmetrics-text; version=1.0.0\r\n\r\n",
                       metrics_registry(lambda: _snapshot(False)))
    assert b"application/openmetrics-text" in reply.split(b"\r\n\r\n")[0] and reply.endswith(b"# EOF\n")


@pytest.mark.parametrize("request_head, status", [
    (b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", b"200 OK"),
    (b"HEAD / HTTP/1.1\r\n\r\n", b"200 OK"),
    (b"GET /other HTTP/1.1\r\n\r\n", b"404 Not Found"),
    (b"DELETE /metrics HTTP/1.1\r\n\r\n", b"405 Method Not Allowed"),
    (b"nonsense\r\n\r\n", b"400 Bad Request"),
])
def test_http_replies(request_head, status):
    reply = http_reply(request_head, metrics_registry(lambda: {"vbds": []}))
    assert reply.startswith(b"HTTP/1.1 " + status)


# ---------------------------------------------------------------- hostile clients (issue 10 D4)

async def _get_metrics(port: int) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        out = b""
        while chunk := await stream.receive_some(65536):
            out += chunk
    return out


def _reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the kernel sends a TCP RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_a_client_resetting_mid_request_is_its_own_problem():
    """Half a request line then a TCP reset: the receive fails with ECONNRESET in that client's task
    only; the endpoint keeps answering (before: the error ended serve_metrics, and with it the daemon)."""
    registry = metrics_registry(lambda: {"vbds": []})
    listeners = await open_metrics_listeners("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as n:
        n.start_soon(serve_metrics, listeners, registry)
        for payload in (b"GET /met", b"", b"GET /metrics HTTP/1.1\r\n"):
            s = socket.create_connection(("127.0.0.1", port))
            if payload:
                s.sendall(payload)
            await trio.sleep(0.05)  # the server is in receive_some
            _reset(s)
            await trio.sleep(0.05)
        # a client that resets while its (large) reply is being sent
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
        s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        await trio.sleep(0.05)
        _reset(s)
        with trio.fail_after(10):
            assert (await _get_metrics(port)).startswith(b"HTTP/1.1 200 OK")
        n.cancel_scope.cancel()
    for listener in listeners:
        listener.socket.close()


async def test_concurrent_clients_are_bounded():
    """Connections held open without a request: no more than MAX_CLIENTS are accepted at once (each
    costs an fd, shared with the guests' event channels); the others wait in the listen backlog and
    are served as the first ones go."""
    registry = metrics_registry(lambda: {"vbds": []})
    listeners = await open_metrics_listeners("127.0.0.1", 0)
    port = listeners[0].socket.getsockname()[1]
    gc.collect()  # an earlier test's garbage holding an fd must not close it between two counts
    fds_before = len(os.listdir("/proc/self/fd"))
    idle = []
    async with trio.open_nursery() as n:
        n.start_soon(serve_metrics, listeners, registry)
        for _ in range(MAX_CLIENTS + 5):
            idle.append(socket.create_connection(("127.0.0.1", port)))
        await trio.sleep(0.3)
        # our client sockets plus the server's accepted ones
        accepted = len(os.listdir("/proc/self/fd")) - fds_before - len(idle)
        assert accepted == MAX_CLIENTS
        for s in idle[:MAX_CLIENTS]:
            s.close()
        with trio.fail_after(10):
            while len(os.listdir("/proc/self/fd")) - fds_before - len(idle[MAX_CLIENTS:]) != 5:
                await trio.sleep(0.02)
        for s in idle[MAX_CLIENTS:]:
            s.close()
        with trio.fail_after(10):
            assert (await _get_metrics(port)).startswith(b"HTTP/1.1 200 OK")
        n.cancel_scope.cancel()
    for listener in listeners:
        listener.socket.close()


def test_storage_link_metrics():
    """The storage link of a vbd whose vhost-user server is away: connected 0, losses, reconnects, retried."""
    snap = _snapshot(with_latency=False)
    snap["vbds"][0]["storage"] = {"state": "reconnecting", "losses": 2, "reconnects": 1, "attempts": 3,
                                  "retried": 17, "last_error": "refused", "away_s": 1.5}
    got = _scrape(snap)
    vbd = (("devid", "51712"), ("domain", "web1"), ("domid", "5"), ("vdev", "xvda"))
    assert got[("xenblk_vbd_storage_connected", vbd)] == 0
    assert got[("xenblk_vbd_storage_losses_total", vbd)] == 2
    assert got[("xenblk_vbd_storage_reconnects_total", vbd)] == 1
    assert got[("xenblk_vbd_storage_retried_requests_total", vbd)] == 17
    snap["vbds"][0]["storage"]["state"] = "connected"
    assert _scrape(snap)[("xenblk_vbd_storage_connected", vbd)] == 1
