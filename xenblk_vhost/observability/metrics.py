"""`run --metrics HOST:PORT`: the service's counters in Prometheus' text format, served from trio.

    registry = metrics_registry(lambda: service_snapshot(service))
    listeners = await open_metrics_listeners("127.0.0.1", 9477)   # bind errors come out here
    nursery.start_soon(serve_metrics, listeners, registry)
    # GET /metrics -> text/plain; version=0.0.4 (or OpenMetrics if the scraper asks for it)

No counter lives here: ServiceCollector reads the same snapshot as the
control socket (snapshot.py) at scrape time and turns it into
metric families. The HTTP side is a tiny trio handler (GET or HEAD of
/metrics, one request per connection): no thread, unlike
prometheus_client's start_http_server.

Metrics (labels domain, domid, devid, vdev; per ring also `ring`). `domain`
is the domain's name (the YAML's key, which survives the new domid of every
guest boot; its domid for a file that names none):
  xenblk_vbd_requests_total{op=read|write|flush|discard}   blkback's rd_req, wr_req, f_req, ds_req
  xenblk_vbd_bytes_total{op=read|write}                    rd_sect, wr_sect x 512
  xenblk_vbd_out_of_requests_total                         oo_req
  xenblk_vbd_errors_total                                  error responses
  xenblk_vbd_spurious_wakeups_total                        event-channel wake-ups that found no request
                                                           (a notify storm; the backoff bounds its cost)
  xenblk_vbd_engine_requests_total                         requests the compiled ring engine served
  xenblk_vbd_engine_poll_requests_total                    of those, taken in the engine's own poll
  xenblk_vbd_engine_syscalls_total{kind=all|sleep}         kernel calls the engine made itself, and of
                                                           them its sleeps (per request: what each costs
                                                           a PV dom0, a trip through Xen apiece)
  xenblk_vbd_engine_copy_segments_total{how=mapped|xen}    the engine's grant-copy segments: copied by it
                                                           from or to persistently mapped pages, or by Xen
  xenblk_vbd_requests_in_flight, xenblk_vbd_persistent_grants, xenblk_vbd_ring_halted
  xenblk_vbd_connected, xenblk_vbd_rings, xenblk_vbd_paused, xenblk_vbd_state (xenbus state number)
                                                           per vbd
  xenblk_vbd_info{..., kind, driver, path, data_path}      always 1: what serves the vbd
  xenblk_vbd_storage_connected                             1 while the storage instance serves, 0 while
                                                           it is lost and being reconnected (per vbd)
  xenblk_vbd_storage_losses_total, xenblk_vbd_storage_reconnects_total,
  xenblk_vbd_storage_retried_requests_total                the storage failing as a whole, a new
                                                           instance taking over, requests run again on it
  xenblk_vbd_request_latency_seconds                       per vbd histogram, when the datapath
                                                           measures latency (a ring snapshot's
                                                           "latency": {"bounds", "counts", "sum"})
  xenblk_vhost_info{version}                               always 1
  process_*                                                prometheus_client's ProcessCollector: CPU
                                                           seconds, resident memory, open fds (and
                                                           their limit), start time
Counters restart from zero when a frontend reconnects (as blkback's do);
Prometheus' rate() treats that as a counter reset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import trio
from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from .. import __version__
from ..xen.xenbus import XenbusState
from .listen_address import MetricsAddressError, parse_listen_address  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

SECTOR_BYTES = 512
MAX_REQUEST_HEAD = 8192
# Connections served at once: each is an fd, and the process' fds are shared with the guests'
# event channels and grant mappings. More wait in the listen backlog (a scrape is milliseconds).
MAX_CLIENTS = 16
REQUEST_TIMEOUT = 10.0
_VBD_LABELS = ("domain", "domid", "devid", "vdev")
_INFO_LABELS = _VBD_LABELS + ("kind", "driver", "path", "data_path")
_RING_LABELS = _VBD_LABELS + ("ring",)


def merged_latency(rings: Iterable[dict]) -> dict | None:
    """The rings' latency histograms added up; None if the datapath measures none."""
    merged = None
    for ring in rings:
        lat = ring.get("latency")
        if not lat:
            continue
        if merged is None:
            merged = {"bounds": list(lat["bounds"]), "counts": list(lat["counts"]), "sum": lat["sum"]}
        elif list(lat["bounds"]) == merged["bounds"]:
            merged["counts"] = [a + b for a, b in zip(merged["counts"], lat["counts"])]
            merged["sum"] += lat["sum"]
    return merged


def cumulative_buckets(latency: dict) -> list[tuple[str, float]]:
    """Per-bucket counts (the last one: slower than every bound) -> Prometheus' cumulative `le` buckets."""
    out, running = [], 0
    for bound, count in zip(latency["bounds"], latency["counts"]):
        running += count
        out.append((repr(float(bound)), running))
    out.append(("+Inf", running + sum(latency["counts"][len(latency["bounds"]):])))
    return out


class ServiceCollector(Collector):
    """Metric families built from a service snapshot at each scrape."""

    def __init__(self, snapshot: Callable[[], dict]) -> None:
        self._snapshot = snapshot

    def describe(self):
        return []  # families depend on the devices present: nothing to check at registration

    def collect(self):
        snap = self._snapshot()
        info = GaugeMetricFamily("xenblk_vhost_info", "xenblk-vhost build information", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        requests = CounterMetricFamily("xenblk_vbd_requests", "Requests dispatched to the storage, by operation "
                                       "(blkback rd_req, wr_req, f_req: flushes and barriers, ds_req)",
                                       labels=_RING_LABELS + ("op",))
        moved = CounterMetricFamily("xenblk_vbd_bytes", "Bytes of requests dispatched (blkback rd_sect, wr_sect "
                                    "x 512)", labels=_RING_LABELS + ("op",))
        oo = CounterMetricFamily("xenblk_vbd_out_of_requests", "Times the ring had requests waiting while every "
                                 "request slot was busy (blkback oo_req)", labels=_RING_LABELS)
        errors = CounterMetricFamily("xenblk_vbd_errors", "Responses with an error status", labels=_RING_LABELS)
        spurious = CounterMetricFamily("xenblk_vbd_spurious_wakeups", "Event-channel wake-ups that found no "
                                       "request on the ring (a notify storm)", labels=_RING_LABELS)
        engine = CounterMetricFamily("xenblk_vbd_engine_requests", "Requests the compiled ring engine took off "
                                     "the ring (the others went through the Python reference path)",
                                     labels=_RING_LABELS)
        polled = CounterMetricFamily("xenblk_vbd_engine_poll_requests", "Of the engine's requests, those taken "
                                     "in its own poll (no Python between the event and the answer)",
                                     labels=_RING_LABELS)
        syscalls = CounterMetricFamily("xenblk_vbd_engine_syscalls", "Kernel calls the compiled ring engine "
                                       "made itself (kind=all), and of them its sleeps in poll (kind=sleep)",
                                       labels=_RING_LABELS + ("kind",))
        copied = CounterMetricFamily("xenblk_vbd_engine_copy_segments", "Grant-copy segments of the compiled ring "
                                     "engine: copied by it from or to persistently mapped pages (how=mapped), or "
                                     "by Xen's grant copy (how=xen)", labels=_RING_LABELS + ("how",))
        in_flight = GaugeMetricFamily("xenblk_vbd_requests_in_flight", "Requests taken from the ring and not yet "
                                      "answered", labels=_RING_LABELS)
        pgrants = GaugeMetricFamily("xenblk_vbd_persistent_grants", "Grants kept mapped for the frontend",
                                    labels=_RING_LABELS)
        halted = GaugeMetricFamily("xenblk_vbd_ring_halted", "1 if the ring was stopped for a bogus frontend",
                                   labels=_RING_LABELS)
        connected = GaugeMetricFamily("xenblk_vbd_connected", "1 while the frontend's rings are served",
                                      labels=_VBD_LABELS)
        rings = GaugeMetricFamily("xenblk_vbd_rings", "Rings (queues) the frontend connected",
                                  labels=_VBD_LABELS)
        latency = HistogramMetricFamily("xenblk_vbd_request_latency_seconds", "Time from taking a request off "
                                        "the ring to pushing its response", labels=_VBD_LABELS)
        info = GaugeMetricFamily("xenblk_vbd_info", "What serves the vbd (always 1)", labels=_INFO_LABELS)
        paused = GaugeMetricFamily("xenblk_vbd_paused", "1 while the operator has the vbd paused "
                                   "(xenblk-vhost ctl pause)", labels=_VBD_LABELS)
        state = GaugeMetricFamily("xenblk_vbd_state", "The backend's xenbus state (4 Connected, 5 Closing, "
                                  "6 Closed...)", labels=_VBD_LABELS)
        storage_up = GaugeMetricFamily("xenblk_vbd_storage_connected", "1 while the storage serves, 0 while it "
                                       "is lost and reconnecting (a killed vhost-user server)", labels=_VBD_LABELS)
        losses = CounterMetricFamily("xenblk_vbd_storage_losses", "Times the storage failed as a whole while "
                                     "serving", labels=_VBD_LABELS)
        reconnects = CounterMetricFamily("xenblk_vbd_storage_reconnects", "Times a new storage instance took "
                                         "over after a loss", labels=_VBD_LABELS)
        retried = CounterMetricFamily("xenblk_vbd_storage_retried_requests", "Requests in flight at a loss, run "
                                      "again on the new storage instance", labels=_VBD_LABELS)
        for vbd in snap.get("vbds", []):
            domain = vbd.get("domain") or str(vbd["domid"])
            who = [domain, str(vbd["domid"]), str(vbd["devid"]), vbd["vdev"]]
            connected.add_metric(who, 1 if vbd.get("serving") else 0)
            rings.add_metric(who, len(vbd["rings"]))
            info.add_metric(who + [str(vbd.get("kind") or ""), str(vbd.get("driver") or ""),
                                   str(vbd.get("path") or ""), str(vbd.get("data_path") or "")], 1)
            paused.add_metric(who, 1 if vbd.get("paused") else 0)
            link = vbd.get("storage")
            if link:
                storage_up.add_metric(who, 1 if link["state"] == "connected" else 0)
                losses.add_metric(who, link["losses"])
                reconnects.add_metric(who, link["reconnects"])
                retried.add_metric(who, link["retried"])
            member = XenbusState.__members__.get(str(vbd.get("state")))
            if member is not None:
                state.add_metric(who, int(member))
            for index, ring in enumerate(vbd["rings"]):
                labels = who + [str(index)]
                for op, key in (("read", "rd_req"), ("write", "wr_req"), ("flush", "f_req"), ("discard", "ds_req")):
                    requests.add_metric(labels + [op], ring[key])
                moved.add_metric(labels + ["read"], ring["rd_sect"] * SECTOR_BYTES)
                moved.add_metric(labels + ["write"], ring["wr_sect"] * SECTOR_BYTES)
                oo.add_metric(labels, ring["oo_req"])
                errors.add_metric(labels, ring["errors"])
                spurious.add_metric(labels, ring.get("spurious_wakeups", 0))
                engine.add_metric(labels, ring.get("engine_req", 0))
                polled.add_metric(labels, ring.get("poll_req", 0))
                syscalls.add_metric(labels + ["all"], ring.get("engine_syscalls", 0))
                syscalls.add_metric(labels + ["sleep"], ring.get("engine_sleeps", 0))
                copied.add_metric(labels + ["mapped"], ring.get("copy_segs_mapped", 0))
                copied.add_metric(labels + ["xen"], ring.get("copy_segs_xen", 0))
                in_flight.add_metric(labels, ring["in_flight"])
                pgrants.add_metric(labels, ring["persistent_grants"])
                halted.add_metric(labels, 1 if ring["halted"] else 0)
            merged = merged_latency(vbd["rings"])
            if merged is not None:
                latency.add_metric(who, cumulative_buckets(merged), merged["sum"])
        yield from (requests, moved, oo, errors, spurious, engine, polled, syscalls, copied, in_flight, pgrants, halted,
                    connected, rings, latency, info, paused, state, storage_up, losses, reconnects, retried)


def metrics_registry(snapshot: Callable[[], dict]) -> CollectorRegistry:
    """A registry of its own (not the process-global one): the service's families and process_*."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(snapshot))
    ProcessCollector(registry=registry)
    return registry


def _response(status: str, body: bytes, content_type: str, *, head: bool = False) -> bytes:
    headers = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
               f"Connection: close\r\n\r\n").encode()
    return headers if head else headers + body


def http_reply(head: bytes, registry: CollectorRegistry) -> bytes:
    """The whole HTTP response to one request head (request line + headers)."""
    text = head.decode("latin-1")
    request_line, _, rest = text.partition("\r\n")
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response("400 Bad Request", b"bad request\n", "text/plain; charset=utf-8")
    method, target, _ = parts
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"GET /metrics\n", "text/plain; charset=utf-8")
    path = target.split("?", 1)[0]
    if path == "/":
        return _response("200 OK", b"xenblk-vhost: metrics at /metrics\n", "text/plain; charset=utf-8",
                         head=method == "HEAD")
    if path != "/metrics":
        return _response("404 Not Found", b"not found: try /metrics\n", "text/plain; charset=utf-8")
    accept = ""
    for line in rest.split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "accept":
            accept = value.strip()
    encoder, content_type = choose_encoder(accept)
    return _response("200 OK", encoder(registry), content_type, head=method == "HEAD")


async def _serve_http_client(stream: trio.abc.Stream, registry: CollectorRegistry) -> None:
    """One client, whatever it does: a reset, garbage or a failing scrape ends this client only."""
    try:
        async with stream:
            with trio.move_on_after(REQUEST_TIMEOUT):
                await _answer(stream, registry)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
        log.debug("metrics: client gone: %s", e)
    except Exception:
        log.exception("metrics: answering a client failed (the endpoint goes on)")


async def _answer(stream: trio.abc.Stream, registry: CollectorRegistry) -> None:
    buf = bytearray()
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        if len(buf) > MAX_REQUEST_HEAD:
            reply = _response("431 Request Header Fields Too Large", b"", "text/plain")
            break
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        buf += chunk
    else:
        reply = http_reply(bytes(buf).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), registry)
    await stream.send_all(reply)


async def open_metrics_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Listening sockets for host:port (every address the name resolves to); a clear OSError if not."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as e:
        refused = OSError(f"--metrics {host}:{port}: {e.strerror or e}")  # read as is in run's "stopped: ..."
        refused.errno = e.errno
        raise refused from e


async def serve_metrics(listeners: list[trio.SocketListener], registry: CollectorRegistry) -> None:
    """Answer GET /metrics on the listeners until cancelled (the caller closes them afterwards)."""
    bound = [listener.socket.getsockname() for listener in listeners]
    log.info("metrics: %s", ", ".join(f"http://{a[0]}:{a[1]}/metrics" for a in bound))

    slots = trio.Semaphore(MAX_CLIENTS)  # shared by every listener

    async def serve_client(stream) -> None:
        try:
            await _serve_http_client(stream, registry)
        finally:
            slots.release()

    async def serve_one(listener) -> None:
        async with trio.open_nursery() as clients:
            while True:
                await slots.acquire()  # accept only with a free slot: the rest wait in the backlog
                try:
                    stream = await listener.accept()
                except OSError as e:  # EMFILE and friends: do not spin, do not die
                    slots.release()
                    log.warning("metrics: accept failed: %s", e)
                    await trio.sleep(0.1)
                    continue
                except BaseException:
                    slots.release()
                    raise
                clients.start_soon(serve_client, stream)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(serve_one, listener)
