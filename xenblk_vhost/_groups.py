"""Exception-group helpers shared by the context managers that own a nursery."""

from __future__ import annotations


def reraise_alone(group: BaseExceptionGroup) -> None:
    """Re-raise the only exception of `group` as itself, its cause and context untouched
    (the group wrapper is an artefact of our nursery, not part of the caller's story).
    Returns (raising nothing) when the group holds more than one exception."""
    if len(group.exceptions) != 1:
        return
    exc = group.exceptions[0]
    saved = exc.__cause__, exc.__context__, exc.__suppress_context__
    try:
        raise exc
    finally:
        exc.__cause__, exc.__context__, exc.__suppress_context__ = saved


def leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions at the bottom of (nested) exception groups; [exc] for a plain one."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]
