"""pytest fixtures that start the simulated Xen services (a plugin: tests/conftest.py loads it).

xenstored: the simulated xenstored, in this process, on a socket in tmp_path.
xs:        a dom0 xenstore client connected to it (a module may override this
           fixture to add nodes, still depending on `xenstored`).
hv_socket: a simulated hypervisor process for the whole module.
platform:  the backend's Platform on it (closed at teardown).
"""

from __future__ import annotations

import pytest

from xenblk_vhost.sim import open_sim
from xenblk_vhost.sim.hypervisor import running_hypervisor
from xenblk_vhost.sim.xenstored import serve_xenstored
from xenblk_vhost.xen.xenstore import open_xenstore


@pytest.fixture
async def xenstored(tmp_path):
    async with serve_xenstored(str(tmp_path / "xs.sock")) as server:
        yield server


@pytest.fixture
async def xs(xenstored):
    async with open_xenstore(xenstored.socket_path) as client:
        yield client


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
