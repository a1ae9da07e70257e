"""The house rules of ARCHITECTURE.md, kept true: pure modules load no I/O, no import cycles,
rooms import each other only as the map allows, and nothing but the wiring room and the CLI
imports the Node."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "zmesh"

# A module whose docstring says "Pure" (capital P) promises it loads none of these.
IO_MODULES = ("zmq", "asyncio", "socket", "sqlite3", "zeroconf", "ssl", "selectors")
PURE_MARK = re.compile(r"\bPure\b")

# Rooms (subpackages) and the ground floor. A room may import from another room only that
# room's pure modules; security is the floor every room stands on (keys, certificates, ACLs).
ROOMS = ("mesh", "retained", "jobs", "mqtt", "security", "ops", "cli")
MAY_IMPORT_IMPURE_FROM = {
    "mesh": {"security"},
    "retained": {"security"},
    "jobs": {"security", "retained"},
    "mqtt": {"security"},
    "security": set(),
    "ops": set(),  # the probes and metrics see a NodeStatus snapshot, no other room
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


PURE = sorted(
    name for name, path in MODULES.items() if not path.name == "__init__.py" and PURE_MARK.search(_docstring(path))
)


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else ""  # "" is the ground floor


def _imports(path: Path) -> set[str]:
    """Every zmesh module ``path`` imports, at the top, in a function or for type checking."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zmesh"):
            # ``from zmesh.mesh import wire`` imports the module wire (and the package's
            # __init__, which imports nothing); ``from zmesh.mesh.wire import Hello`` wire.
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.append(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("zmesh")]
        found.update(name for name in names if name in MODULES)
    return found


def test_pure_modules_are_the_ones_the_map_names() -> None:
    # The pure rooms ARCHITECTURE.md lists: if one stops saying "Pure", this fails, and the
    # map or the module is wrong.
    expected = {
        "zmesh.config.model", "zmesh.config.values", "zmesh.config.loader", "zmesh.ports", "zmesh.routing", "zmesh.topics", "zmesh.drops", "zmesh.health",
        "zmesh.jobs.dispatcher",
        "zmesh.mesh.membership", "zmesh.mesh.policy", "zmesh.mesh.wire", "zmesh.mesh.swim", "zmesh.mesh.plumtree",
        "zmesh.mesh.streamwire", "zmesh.mesh.outbox", "zmesh.mesh.streams", "zmesh.mesh.flow",
        "zmesh.mqtt.codec", "zmesh.mqtt.decoder", "zmesh.mqtt.encoder", "zmesh.mqtt.packets",
        "zmesh.mqtt.properties", "zmesh.mqtt.session",
        "zmesh.retained.hlc", "zmesh.retained.lastvalue", "zmesh.retained.topictree",
        "zmesh.security.acl", "zmesh.security.passwd",
        "zmesh.ops.status", "zmesh.ops.latency",
    }
    assert expected <= set(PURE), sorted(expected - set(PURE))


@pytest.mark.parametrize("module", PURE)
def test_pure_module_loads_no_io(module: str) -> None:
    code = (
        "import importlib, json, sys\n"
        f"importlib.import_module({module!r})\n"
        f"print(json.dumps(sorted(m for m in {IO_MODULES!r} if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [], f"{module} is marked Pure but loads {result.stdout.strip()}"


def test_every_module_imports_alone_without_a_cycle() -> None:
    # python-zeroconf's guard: a cycle often shows only when a module is the first one
    # imported. Each module is imported into an interpreter that holds no zmesh module.
    code = (
        "import importlib, json, sys, traceback\n"
        "failed = {}\n"
        f"for name in {sorted(set(MODULES) - {'zmesh.__main__'})!r}:\n"
        "    for loaded in [m for m in sys.modules if m == 'zmesh' or m.startswith('zmesh.')]:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception:\n"
        "        failed[name] = traceback.format_exc(limit=3)\n"
        "print(json.dumps(failed))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {}


def test_rooms_import_each_other_only_as_the_map_allows() -> None:
    wrong = []
    for module, path in MODULES.items():
        room = _room(module)
        for target in _imports(path):
            target_room = _room(target)
            if target in ("zmesh.node", "zmesh.cli") or target.startswith("zmesh.cli."):
                continue  # checked below
            if target_room == room or target in PURE or target == "zmesh" or target_room == "":
                continue
            if room in ("cli",) or module in ("zmesh.node", "zmesh.__main__"):
                continue  # the wiring room and the outer edge may use any room
            if target_room in MAY_IMPORT_IMPURE_FROM.get(room, set()):
                continue
            wrong.append(f"{module} -> {target}")
    assert not wrong, "imports the map does not allow:\n" + "\n".join(sorted(wrong))


def test_ground_floor_and_security_stand_on_pure_modules_only() -> None:
    # The ground floor (topics, config, ports, routing, ...) and security import no room's
    # I/O module: everything else is built on them.
    wrong = []
    for module, path in MODULES.items():
        if _room(module) in ("", "security") and module not in ("zmesh", "zmesh.node", "zmesh.__main__"):
            for target in _imports(path):
                if target in PURE or target == "zmesh" or _room(target) == "security" and _room(module) == "security":
                    continue
                if _room(target) == "" and target not in ("zmesh.node",):
                    continue
                wrong.append(f"{module} -> {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_only_the_wiring_room_and_the_cli_import_the_node() -> None:
    importers = sorted(
        module
        for module, path in MODULES.items()
        if "zmesh.node" in _imports(path) and module != "zmesh.node"
    )
    # zmesh/__init__ re-exports Node lazily (``from zmesh import Node``), the public API.
    assert [m for m in importers if m != "zmesh" and not m.startswith("zmesh.cli")] == []


def test_nothing_outside_the_cli_imports_the_cli() -> None:
    importers = sorted(
        module
        for module, path in MODULES.items()
        if any(t == "zmesh.cli" or t.startswith("zmesh.cli.") for t in _imports(path))
        and not module.startswith("zmesh.cli")
    )
    assert importers == ["zmesh.__main__"]


def test_every_room_says_its_job_and_its_imports() -> None:
    for room in ROOMS:
        doc = _docstring(PACKAGE / room / "__init__.py")
        assert "Rooms:" in doc and "import" in doc.lower(), f"zmesh/{room}/__init__.py says too little"
