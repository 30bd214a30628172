"""The support packages' pytest fixtures, for every test module (no module imports them by hand).

    sim_support.daemons       xenstored, xs (the simulated xenstored and a dom0 client),
                              hv_socket, platform (a simulated hypervisor process, the backend's Platform)
    backend_support.fixtures  guest (a fresh guest domain on hv_socket)
    blkif_support.fixtures    xen_layouts, xen_ring_probe (Xen's headers compiled by gcc, once a session)
    storage_support.fixtures  qsd, vhost_user_disk (a qemu-storage-daemon export), loop_backed_file

Plain helpers (classes, functions, constants) are still imported from their modules.
"""

import logging
import os
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings

# Hypothesis's deadline (200 ms per example) and its too_slow health check are timed performance
# assertions, which the default suite does not make: on a loaded machine they failed examples that
# were right (test_demo_units once at load ~10). What a property test checks is its assertions; a
# test's own @settings still choose its example count.
settings.register_profile("suite", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("suite")

pytest_plugins = [
    "sim_support.daemons",
    "backend_support.fixtures",
    "blkif_support.fixtures",
    "storage_support.fixtures",
]


@pytest.fixture(autouse=True)
def _root_logging_restored():
    """cli.main() run in process configures the root logger (daemon/logs.py) with a handler on the
    stderr of that moment (a test's captured one): put back what was there after every test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(autouse=True, scope="session")
def _journal_dir_of_this_session():
    """`run` keeps its rings' journals in /run/xenblk-vhost/journal by default; the tests' daemons
    (children inherit the environment) keep theirs in a directory of this session, so that two
    test sessions (or a real daemon) never share a file."""
    directory = tempfile.mkdtemp(prefix="xenblk-journals-")
    os.environ["XENBLK_VHOST_JOURNAL_DIR"] = directory
    yield
    shutil.rmtree(directory, ignore_errors=True)
