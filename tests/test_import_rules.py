"""What may import what, checked on the source (ast; nothing is imported or run).

The layers (docs/ARCHITECTURE.md), top to bottom:

    entry points      cli, __main__, daemon/ (run, its start-up checks, logging, systemd), device_model/,
                      platforms (open_platform)
    operator surface  observability/ (control socket, metrics, stats), demo/, hotplug/
    service           backend/ = backend/xenbus/ (control plane) + backend/datapath/, and their
                      contract (backend/contract.py, backend/features.py)
    simulation        sim/, beside the service: each implements or drives the other's interfaces,
                      neither imports the other
    below             blkif/ (sans-I/O protocol), xen/, storage/ (adapters), config, vdev,
                      control_protocol, exit_codes, _groups, log_context

Every import counts, lazy ones inside functions too. A violation is reported
as `module:line imports target: rule`.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = "xenblk_vhost"

ENTRY = ("xenblk_vhost.cli", "xenblk_vhost.__main__", "xenblk_vhost.daemon", "xenblk_vhost.device_model",
         "xenblk_vhost.platforms")
OPERATOR = ("xenblk_vhost.observability", "xenblk_vhost.demo", "xenblk_vhost.hotplug")
SERVICE = ("xenblk_vhost.backend",)
SIM = ("xenblk_vhost.sim",)
BELOW = ("xenblk_vhost.blkif", "xenblk_vhost.xen", "xenblk_vhost.storage", "xenblk_vhost.config",
         "xenblk_vhost.vdev", "xenblk_vhost.control_protocol", "xenblk_vhost.exit_codes", "xenblk_vhost._groups",
         "xenblk_vhost.log_context", "xenblk_vhost.native")
# The sans-I/O core touches no file, socket, process or event loop.
IO_MODULES = ("trio", "socket", "os", "select", "selectors", "subprocess", "asyncio", "fcntl", "mmap", "signal",
              "ctypes", "cffi")

# (who, may not import, why). A module matches a name when it is that module or inside that package.
RULES: list[tuple[tuple[str, ...], tuple[str, ...], str]] = [
    (SIM, SERVICE, "sim and backend are siblings: the simulator never imports the service"),
    (SERVICE, SIM, "sim and backend are siblings: the service never imports the simulator"),
    (BELOW, ENTRY + OPERATOR + SERVICE + SIM, "protocol and adapters never import upward"),
    (("xenblk_vhost.blkif",), tuple(m for m in BELOW if m != "xenblk_vhost.blkif"),
     "blkif is the sans-I/O core: it imports only itself"),
    (SERVICE, ENTRY + OPERATOR, "the service never imports its entry points or operator surfaces"),
    (("xenblk_vhost.backend.datapath",), ("xenblk_vhost.backend.xenbus",),
     "the datapath never imports the control plane (their seam is backend/contract.py)"),
    (SIM + ("xenblk_vhost.hotplug",), ENTRY + ("xenblk_vhost.observability", "xenblk_vhost.demo"),
     "sim and hotplug never import the operator surface, the demo or the entry points"),
    (("xenblk_vhost.observability",), ENTRY + ("xenblk_vhost.demo", "xenblk_vhost.hotplug"),
     "the operator surface never imports the demo, the hotplug script or the entry points"),
    (("xenblk_vhost.demo",), ENTRY + ("xenblk_vhost.hotplug",),
     "the demo never imports the hotplug script or the entry points"),
    (tuple(m for m in ENTRY + OPERATOR + SERVICE + BELOW
           if m not in ("xenblk_vhost.platforms", "xenblk_vhost.demo")), SIM,
     "only platforms.open_platform and the demo know the simulator exists"),
    (("xenblk_vhost.backend.xenbus",), ("xenblk_vhost.backend.datapath",),
     "the control plane reaches the datapath only through backend/contract.py "
     "(and the default factory, backend.datapath.vbd)"),
]
# Allowed exceptions to the rules above, as (importer, target) prefixes.
ALLOWED = {
    ("xenblk_vhost.backend.xenbus.device", "xenblk_vhost.backend.datapath.vbd"),  # default_open_vbd: Vbd.open
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def within(module: str, names: tuple[str, ...]) -> bool:
    return any(module == n or module.startswith(n + ".") for n in names)


def imports_of(path: Path, root: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in the file, relative ones resolved."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import sim`: the name may itself be a module
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node.lineno))
    return found


def import_graph(root: Path) -> dict[str, list[tuple[str, int]]]:
    files = sorted((root / PKG).rglob("*.py"))
    known = {module_name(f, root) for f in files}
    return {module_name(f, root): imports_of(f, root, known) for f in files}


def violations(graph: dict[str, list[tuple[str, int]]]) -> list[str]:
    out = []
    for module, targets in graph.items():
        for target, line in targets:
            if within(module, ("xenblk_vhost.blkif",)) and within(target, IO_MODULES):
                out.append(f"{module}:{line} imports {target}: blkif is sans-I/O")
            if not within(target, (PKG,)) or within(target, (module,)):
                continue
            if any(within(module, (a,)) and within(target, (b,)) for a, b in ALLOWED):
                continue
            for who, forbidden, why in RULES:
                if within(module, who) and within(target, forbidden) and not within(target, who):
                    out.append(f"{module}:{line} imports {target}: {why}")
                    break
    return out


def test_every_module_imports_along_the_layers():
    graph = import_graph(ROOT)
    assert len(graph) > 80  # the whole package was read
    assert violations(graph) == []


def test_the_layers_cover_every_package():
    """A new top-level module or package must be placed in a layer (and so fall under the rules)."""
    placed = ENTRY + OPERATOR + SERVICE + SIM + BELOW + ("xenblk_vhost",)
    unplaced = [m for m in import_graph(ROOT) if not within(m, placed[:-1]) and m != "xenblk_vhost"]
    assert unplaced == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / PKG / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


def test_the_checker_catches_imports_across_the_rules(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "cli.py": "",
        "sim/__init__.py": "",
        "sim/world.py": "from ..backend.xenbus import service\n",
        "backend/__init__.py": "",
        "backend/xenbus/__init__.py": "",
        "backend/xenbus/service.py": "def f():\n    from ... import sim\n",
        "backend/datapath/__init__.py": "",
        "backend/datapath/vbd.py": "from ..xenbus.service import Service\n",
        "blkif/__init__.py": "",
        "blkif/ring.py": "import trio\nfrom ..observability import metrics\n",
        "blkif/abi.py": "from ..storage import limits\n",
        "storage/__init__.py": "",
        "storage/limits.py": "from xenblk_vhost.cli import main\n",
        "hotplug/__init__.py": "",
        "hotplug/daemon.py": "from ..observability.control_socket import ControlSocket\n",
        "observability/__init__.py": "",
        "observability/metrics.py": "",
        "observability/control_socket.py": "from ..demo import command\n",
        "demo/__init__.py": "",
        "demo/command.py": "from .. import sim\nfrom ..backend.xenbus import service\n",
    })
    found = violations(import_graph(root))
    expected = [
        "xenblk_vhost.backend.datapath.vbd:1 imports xenblk_vhost.backend.xenbus.service: the datapath never",
        "xenblk_vhost.backend.xenbus.service:2 imports xenblk_vhost.sim: sim and backend are siblings",
        "xenblk_vhost.blkif.abi:1 imports xenblk_vhost.storage.limits: blkif is the sans-I/O core",
        "xenblk_vhost.blkif.ring:1 imports trio: blkif is sans-I/O",
        "xenblk_vhost.blkif.ring:2 imports xenblk_vhost.observability.metrics: protocol and adapters never import "
        "upward",
        "xenblk_vhost.hotplug.daemon:1 imports xenblk_vhost.observability.control_socket: sim and hotplug never",
        "xenblk_vhost.observability.control_socket:1 imports xenblk_vhost.demo.command: the operator surface never",
        "xenblk_vhost.sim.world:1 imports xenblk_vhost.backend.xenbus.service: sim and backend are siblings",
        "xenblk_vhost.storage.limits:1 imports xenblk_vhost.cli: protocol and adapters never import upward",
    ]
    assert len(found) == len(expected), found
    for want in expected:
        assert any(line.startswith(want) for line in found), (want, found)
    # the demo may know the simulator and the service: nothing reported for it
    assert not [line for line in found if line.startswith("xenblk_vhost.demo")]
