"""
The daemon's open files: its soft limit raised to the hard one at start,
and the client connections they allow (txgateway/daemon/openfiles.py).
"""

from __future__ import annotations

import resource

import pytest

from txgateway.daemon.openfiles import FILES_KEPT, MOST_OPEN_FILES, connections_for, raise_open_files_limit


class FakeResource:
    """The C{resource} module's open-files limit, in memory; C{refuses} makes C{setrlimit} fail as Linux does."""

    RLIMIT_NOFILE = resource.RLIMIT_NOFILE
    RLIM_INFINITY = resource.RLIM_INFINITY

    def __init__(self, soft: int, hard: int, refuses: bool = False) -> None:
        self.limits = (soft, hard)
        self.refuses = refuses

    def getrlimit(self, which: int) -> tuple[int, int]:
        assert which == self.RLIMIT_NOFILE
        return self.limits

    def setrlimit(self, which: int, limits: tuple[int, int]) -> None:
        assert which == self.RLIMIT_NOFILE
        if self.refuses:
            raise ValueError("not allowed to raise maximum limit")
        self.limits = limits


def test_the_soft_limit_is_raised_to_the_hard_one():
    limits = FakeResource(1024, 524288)
    assert raise_open_files_limit(limits) == 524288
    assert limits.limits == (524288, 524288)


def test_an_unlimited_hard_limit_raises_the_soft_one_to_what_linux_takes():
    limits = FakeResource(1024, resource.RLIM_INFINITY)
    assert raise_open_files_limit(limits) == MOST_OPEN_FILES
    assert limits.limits == (MOST_OPEN_FILES, resource.RLIM_INFINITY)


@pytest.mark.parametrize("soft, hard", [(4096, 4096), (MOST_OPEN_FILES + 1, resource.RLIM_INFINITY)])
def test_a_soft_limit_already_as_high_is_left_as_it_is(soft, hard):
    limits = FakeResource(soft, hard)
    assert raise_open_files_limit(limits) == soft
    assert limits.limits == (soft, hard)


def test_an_unlimited_soft_limit_is_left_and_counted_as_what_a_process_can_hold():
    limits = FakeResource(resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    assert raise_open_files_limit(limits) == MOST_OPEN_FILES  # never a negative count of files
    assert limits.limits == (resource.RLIM_INFINITY, resource.RLIM_INFINITY)


def test_a_limit_that_cannot_be_raised_is_kept():
    limits = FakeResource(1024, 524288, refuses=True)
    assert raise_open_files_limit(limits) == 1024
    assert limits.limits == (1024, 524288)


def test_the_real_limit_of_this_process_is_a_number_it_may_hold():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        raised = raise_open_files_limit(resource)
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised >= soft
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_each_connection_takes_two_files_beside_those_kept_and_the_idle_pools():
    assert connections_for(1024, 0) == (1024 - FILES_KEPT) // 2 == 384
    assert connections_for(1024, 3 * 64) == (1024 - FILES_KEPT - 192) // 2 == 288
    assert connections_for(65536, 64) == 32608


def test_the_idle_pools_take_at_most_a_quarter_of_the_files():
    # Thirty endpoints' pools (1,920 idle connections at most) beside a hard limit of 1,024.
    assert connections_for(1024, 30 * 64) == (1024 - FILES_KEPT - 256) // 2 == 256


def test_too_few_files_still_serve_one_connection():
    assert connections_for(100, 640) == 1
