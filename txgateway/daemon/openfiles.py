"""
The daemon's open files, and the client connections they allow.

Every open stream holds two descriptors: its client's connection and its
backend's.  A shell's default soft limit (1,024 on Debian) would stop the
gateway near 500 streams, long before its CPU or memory; the hard limit
(524,288 under systemd, C{LimitNOFILE} in C{contrib/systemd}) is what the
operator allowed.  So the daemon raises its soft limit to the hard one at
start, as Go's runtime and nginx's C{worker_rlimit_nofile} do, and takes
no more client connections than what is left after the descriptors that
are not a stream's (L{connections_for}): past that, a connection is
answered C{503 gateway_busy} instead of failing a backend connection
half-way through someone else's stream.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FILES_KEPT", "MOST_OPEN_FILES", "connections_for", "raise_open_files_limit"]

#: Descriptors kept for what is not a stream: listeners, log and state
#: files, Redis and the workers' links, the reactor's own, a spare for
#: Twisted's accept when none is left.
FILES_KEPT = 256
#: The soft limit asked for when the hard one is unlimited (Linux's
#: C{fs.nr_open} default: a larger one is refused).
MOST_OPEN_FILES = 1 << 20


def raise_open_files_limit(resource: Any) -> int:
    """
    Raise this process's soft limit on open files to its hard limit (or
    L{MOST_OPEN_FILES}, when that is unlimited); a limit that cannot be
    raised is left as it is.  Returns the soft limit now (an unlimited
    one as L{MOST_OPEN_FILES}: the most a process can hold on Linux).

    @param resource: the C{resource} module (a test passes its own).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MOST_OPEN_FILES
    wanted = MOST_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError):
            return soft
        return wanted
    return soft


def connections_for(open_files: int, idle_pooled: int) -> int:
    """
    The most client connections C{open_files} descriptors serve, each with
    its backend connection, beside L{FILES_KEPT} and the idle backend
    connections the pools may keep (C{idle_pooled}, counted up to a
    quarter of the files: many pools are never all full at once, and a
    backend connection that still finds no descriptor is answered 503
    C{gateway_busy}, no failure of the backend).  At least 1.
    """
    return max(1, (open_files - FILES_KEPT - min(idle_pooled, open_files // 4)) // 2)
