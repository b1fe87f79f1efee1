"""Fork safety, in one place: what every object of statekeep resets in a forked child.

A child made by ``fork()`` inherits a copy of every lock as it was at the instant of the
fork (possibly held by a thread that does not exist in the child), every open file
descriptor (whose ``flock`` it then shares with the parent) and no thread but the one
that forked. Each object that owns a lock, a descriptor or a thread registers a reset
here; one ``os.register_at_fork`` hook runs them all in the child, before any user code.

Objects are held weakly: registering never keeps an object alive.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable

__all__ = ["forget_in_child", "new_lock", "on_fork_child"]

logger = logging.getLogger("statekeep")

# Bound methods of live objects, called in the child. A WeakMethod dies with its object.
_resets: list[weakref.WeakMethod[Callable[[], None]]] = []
_registry_lock = threading.Lock()


def on_fork_child(reset: Callable[[], None]) -> None:
    """Call the bound method ``reset`` in every child forked from now on.

    ``reset`` must be a bound method (its object is held weakly). It runs in the child
    right after the fork, with only the forking thread alive: it must not take a lock
    the parent may have held, and should only replace locks, forget descriptors
    (without closing what the parent still uses, unless it is the child's own copy)
    and forget threads.
    """
    ref: weakref.WeakMethod[Callable[[], None]] = weakref.WeakMethod(reset)
    with _registry_lock:
        _resets[:] = [r for r in _resets if r() is not None]
        _resets.append(ref)


def forget_in_child(reset: Callable[[], None]) -> None:
    """Stop calling ``reset`` in future children (an object that was closed)."""
    with _registry_lock:
        _resets[:] = [r for r in _resets if r() is not None and r() != reset]


def new_lock() -> threading.Lock:
    """A fresh lock (named so that resets read as what they do)."""
    return threading.Lock()


def _after_fork_in_child() -> None:
    global _registry_lock
    # The parent may have been registering at the instant of the fork.
    _registry_lock = threading.Lock()
    for ref in list(_resets):
        reset = ref()
        if reset is None:
            continue
        try:
            reset()
        except Exception:  # pragma: no cover - a reset must not break the child
            logger.exception("statekeep: resetting %r after fork failed", reset)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
