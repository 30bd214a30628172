"""pytest fixtures for backend datapath tests; import them into a test module:

    from backend_support.fixtures import hv_socket, platform, guest  # noqa: F401

hv_socket: a simulated hypervisor process for the whole module.
platform:  the backend's Platform on it (closed at teardown).
guest:     a fresh guest domain in this process (1024 pages, 8 grant frames),
           closed at teardown.
"""

from __future__ import annotations

import pytest

from xenblk_vhost.sim import open_sim
from xenblk_vhost.sim.guest import Guest
from xenblk_vhost.sim.hypervisor import running_hypervisor


@pytest.fixture(scope="module")
def hv_socket(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hv") / "xen.sock")
    with running_hypervisor(path):
        yield path


@pytest.fixture
def platform(hv_socket):
    p = open_sim(hv_socket)
    yield p
    p.close()


@pytest.fixture
def guest(hv_socket):
    g = Guest.create(hv_socket, pages=1024, grant_frames=8)
    yield g
    g.close()
