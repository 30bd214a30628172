"""pytest fixtures for backend datapath tests (a plugin: tests/conftest.py loads it).

guest:     a fresh guest domain in this process (1024 pages, 8 grant frames) on
           sim_support.daemons' hv_socket, closed at teardown.
"""

from __future__ import annotations

import pytest

from xenblk_vhost.sim.guest import Guest


@pytest.fixture
def guest(hv_socket):
    g = Guest.create(hv_socket, pages=1024, grant_frames=8)
    yield g
    g.close()
