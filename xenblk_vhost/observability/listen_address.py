"""`--metrics HOST:PORT`: the listening address, parsed at argument time.

Its own module so that parsing `run`'s arguments does not import
prometheus_client (metrics.py), which only a daemon serving metrics needs.
"""

from __future__ import annotations

import ipaddress


class MetricsAddressError(ValueError):
    pass


def parse_listen_address(text: str) -> tuple[str, int]:
    """"127.0.0.1:9477", "[::1]:9477", "localhost:9477" -> (host, port); port 0: any free one (logged)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise MetricsAddressError(f"{text!r}: expected HOST:PORT, e.g. 127.0.0.1:9477 or [::1]:9477")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise MetricsAddressError(f"{text!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise MetricsAddressError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:9477")
    return host, int(port)
