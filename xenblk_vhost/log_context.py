"""Who a log line is about: the domain, vdev and device the logging task serves.

    with log_context.bound(domain="web1", domid=5, vdev="xvda", device="vbd-5-51712"):
        ...   # every record this task (and every task it starts) logs carries these fields

trio tasks start with a copy of the context of the task that starts them, so
fields bound at the top of a device's task reach its rings' tasks too. The
log handlers (observability/logs.py) read `fields()` and write them as
journald fields (DOMAIN=web1 VDEV=xvda ...) or JSON keys; the plain text
format leaves them out (the messages already name the device).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import MappingProxyType

# journald's spelling: upper case, letters, digits and underscores.
FIELDS = ("DOMAIN", "DOMID", "VDEV", "DEVICE")

_fields: ContextVar[Mapping[str, str]] = ContextVar("xenblk_vhost_log_fields", default=MappingProxyType({}))


@contextmanager
def bound(**values: object) -> Iterator[None]:
    """Add fields (None values are left out) for the duration of the block, in this task."""
    merged = dict(_fields.get())
    merged.update({key.upper(): str(value) for key, value in values.items() if value is not None})
    token = _fields.set(MappingProxyType(merged))
    try:
        yield
    finally:
        _fields.reset(token)


def fields() -> Mapping[str, str]:
    """The fields bound in the current task (empty outside any device)."""
    return _fields.get()
