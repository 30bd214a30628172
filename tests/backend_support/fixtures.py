"""pytest fixtures for backend datapath tests; import them into a test module:

    from backend_support.fixtures import hv_socket, platform, guest  # noqa: F401

hv_socket: a simulated hypervisor process for the whole module.
platform:  the backend's Platform on it (closed at teardown).
guest:     a fresh guest domain in this process (1024 pages, 8 grant frames),
           closed at teardown.
"""

from __future__ import annotations

import pytest

from sim_support.daemons import hv_socket, platform  # noqa: F401 (re-exported)
from xenblk_vhost.sim.guest import Guest


@pytest.fixture
def guest(hv_socket):
    g = Guest.create(hv_socket, pages=1024, grant_frames=8)
    yield g
    g.close()
