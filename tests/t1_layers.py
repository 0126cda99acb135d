"""The package's shape: imports run one way (cli -> mount -> disks -> engine -> format -> errors),
no cycles, pyfuse3 only under mount/, and the public names stay what they are."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mirenfs
from mirenfs import launch

PACKAGE = Path(mirenfs.__file__).parent
# Lower numbers sit lower; a module may import its own layer and the ones below it.
LAYERS = {"errors": 0, "format": 1, "engine": 2, "disks": 3, "mount": 4, "cli": 5}
TOP = 6  # api.py, __init__.py, __main__.py, launch.py: the front doors, which may import anything
# The function-local imports allowed: the CLI loads FUSE only for the commands that mount, and
# the etcd client (requests, futurist: ~0.1 s) only when an etcd catalogue is opened, and
# importlib.metadata (~25 ms) only for --version, and difflib only when FUSE refused an -o option;
# the entry points load their command inside the guard that makes an early Ctrl-C one line.
LAZY_IMPORTS = {
    ("mirenfs.launch", "mirenfs.cli"),
    ("mirenfs.launch", "mirenfs.cli.main"),
    ("mirenfs.launch", "mirenfs.cli.mount_helper"),
    ("mirenfs.launch", "mirenfs.cli.mount_helper.main"),
    ("mirenfs.cli", "importlib.metadata"),
    ("mirenfs.cli.mount_cmds", "mirenfs.mount.session"),
    ("mirenfs.mount.config", "difflib"),
    ("mirenfs.disks.catalogs", "mirenfs.disks.etcd"),
    ("mirenfs.disks.catalogs", "mirenfs.disks.etcd.EtcdCatalog"),
}

EXPORTED = [
    "FORMAT_VERSION",
    "MAGIC",
    "BackupTarget",
    "Catalog",
    "CatalogUnreachableError",
    "CreatedDisk",
    "Disk",
    "DiskCreator",
    "DiskNotFoundError",
    "DiskResolver",
    "DiskState",
    "FormatError",
    "ImageChangedError",
    "Lease",
    "LeaseState",
    "Meta",
    "MirenfsError",
    "RestoreTarget",
    "Store",
    "TargetError",
    "Timestamp",
    "Volume",
    "VolumeState",
    "backup",
    "open_catalog",
    "prepare_backup",
    "prepare_restore",
    "read_header",
    "restore_image",
    "validate_disk_name",
    "write_header",
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return TOP
    return LAYERS.get(parts[1], TOP)


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported module, whether the import is inside a function) for every import in a file."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import):
                found.extend((alias.name, inner) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                found.append((child.module, inner))
                # `from mirenfs.disks import live` imports the module mirenfs.disks.live
                found.extend((f"{child.module}.{alias.name}", inner) for alias in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def internal_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {
        # `from mirenfs.cli import demo` in mirenfs/cli/__init__.py names the package itself too
        name: {t for t, nested in imports_of(path) if t in modules and t != name and not nested}
        for name, path in modules.items()
    }


def test_imports_run_down_the_layers_only() -> None:
    upward = []
    for name, path in package_modules().items():
        for target, _nested in imports_of(path):
            lazy = (name, target) in LAZY_IMPORTS
            if target.startswith("mirenfs.") and layer_of(target) > layer_of(name) and not lazy:
                upward.append(f"{name} imports {target}")
    assert upward == []


def test_no_function_local_imports_but_the_lazy_mount() -> None:
    modules = package_modules()
    nested = [
        f"{name} imports {target} inside a function"
        for name, path in modules.items()
        for target, inner in imports_of(path)
        if inner
        and (target in modules or not target.startswith("mirenfs"))
        and (name, target) not in LAZY_IMPORTS
    ]
    assert nested == []


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    state: dict[str, str] = {}
    cycles: list[list[str]] = []

    def walk(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append([*trail[trail.index(target) :], target] if target in trail else [node, target])
            elif target not in state:
                walk(target, [*trail, target])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    return cycles


def test_no_import_cycle() -> None:
    assert find_cycles(internal_graph()) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


def test_pyfuse3_is_imported_only_under_mount() -> None:
    offenders = [
        name
        for name, path in package_modules().items()
        for target, _nested in imports_of(path)
        if target.split(".")[0] == "pyfuse3" and not name.startswith("mirenfs.mount.")
    ]
    assert offenders == []


def test_the_layer_test_sees_an_upward_import(tmp_path: Path) -> None:
    """The checks above can fail: an engine module importing the mount is caught."""
    bad = tmp_path / "probe.py"
    bad.write_text("from mirenfs.mount.operations import MirenOperations\n")
    (target, nested), *_ = imports_of(bad)
    assert layer_of(target) > layer_of("mirenfs.engine.probe") and not nested


@pytest.mark.parametrize(
    "argv",
    [
        ["disk", "list"],
        ["status"],
        ["inspect", "VECTOR"],
        ["verify", "VECTOR"],
        ["backup", "--image", "IMAGE", "--filesystem", "ext4", "-o", "OUT"],
        ["restore", "VECTOR", "--image", "RESTORED"],
    ],
)
def test_commands_that_do_not_mount_never_load_pyfuse3(tmp_path: Path, argv: list[str]) -> None:
    vector = Path(__file__).parent / "vectors" / "go-odd.mirn"
    image = tmp_path / "image"
    image.write_bytes(b"x" * 100_000)
    replace = {
        "VECTOR": str(vector),
        "IMAGE": str(image),
        "OUT": str(tmp_path / "out.mirn"),
        "RESTORED": str(tmp_path / "restored"),
    }
    args = [replace.get(arg, arg) for arg in argv]
    if argv[0] == "disk":
        args += ["--data-path", str(tmp_path)]
    probe = (
        "import sys\n"
        "from mirenfs.cli import main\n"
        f"code = main({args!r})\n"
        "assert 'pyfuse3' not in sys.modules, 'pyfuse3 was loaded'\n"
        "print('pyfuse3 not loaded, exit', code)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert "pyfuse3 not loaded" in done.stdout, done.stderr


def test_public_names_are_pinned() -> None:
    assert sorted(mirenfs.__all__) == sorted(EXPORTED)
    for name in EXPORTED:
        assert getattr(mirenfs, name) is not None


def test_the_entry_points_load_nothing_before_their_guard() -> None:
    """Trial N: a Ctrl-C in a command's first 0.2 s, while Python imported it, printed a
    traceback. The entry point guards the import; before the guard only it and the package
    (whose public names load at first use) are loaded, and ``mirenfs.Store`` still works."""
    probe = (
        "import sys, mirenfs.launch\n"
        "print(sorted(m for m in sys.modules if m.startswith('mirenfs')))\n"
        "print(mirenfs.Store.__module__, mirenfs.DiskState.DELETING.value)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines() == ["['mirenfs', 'mirenfs.launch']", "mirenfs.disks.store deleting"], (
        done.stderr
    )


@pytest.mark.parametrize(("entry", "program"), [("mirenfs", "mirenfs"), ("mount_mirenfs", "mount.mirenfs")])
def test_a_ctrl_c_while_a_command_loads_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], entry: str, program: str
) -> None:
    class CtrlC:
        """Python's import machinery, interrupted by a Ctrl-C as it loads the command."""

        def find_spec(self, name: str, *_args: object) -> None:
            if name.startswith("mirenfs.cli"):
                raise KeyboardInterrupt

    for loaded in [name for name in sys.modules if name.startswith("mirenfs.cli")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setattr(sys, "meta_path", [CtrlC(), *sys.meta_path])
    assert getattr(launch, entry)() == 130
    assert capsys.readouterr().err == f"{program}: interrupted\n"
