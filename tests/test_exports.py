"""The public API is what `txflow` and `txflow.testing` export, and all of it is documented.

Every exported name imports, has a docstring (as the API reference renders it) and has an
entry on an API reference page (docs/reference/*.md), so a feature a user cannot find in the
docs fails here. Examples and benchmarks import only public names: they are what users copy.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path
from types import ModuleType

import griffe
import pytest

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference"
PUBLIC_MODULES = ("txflow", "txflow.testing")
# Exported values that cannot carry a docstring of their own; the reference index
# mentions each of them in prose instead of a `::: name` entry.
UNDOCUMENTED_VALUES = {"txflow.__version__"}
# Private imports allowed in examples/ and benchmarks/, each with the reason.
ALLOWED_PRIVATE_IMPORTS: set[tuple[str, str]] = {
    # Micro-benchmarks of one internal piece each, timed against the library call it
    # replaces; no user writes this code, and no public name reaches the piece alone.
    ("benchmarks/metrics_record.py", "txflow._metrics"),
    ("benchmarks/tracing_spans.py", "txflow._telemetry"),
}
ENTRY = re.compile(r"^::: (\S+)", re.MULTILINE)


def exported() -> list[tuple[ModuleType, str]]:
    return [
        (module, name)
        for module in (importlib.import_module(m) for m in PUBLIC_MODULES)
        for name in module.__all__
    ]


def public_ids() -> list[str]:
    return [f"{module.__name__}.{name}" for module, name in exported()]


@pytest.fixture(scope="module")
def package() -> griffe.Module:
    # The docstrings as mkdocstrings reads them: from the source, re-exports followed.
    loaded = griffe.load("txflow", search_paths=[str(ROOT / "src")], resolve_aliases=True)
    assert isinstance(loaded, griffe.Module)
    return loaded


def reference_entries() -> dict[str, Path]:
    return {
        name: page
        for page in sorted(REFERENCE.glob("*.md"))
        for name in ENTRY.findall(page.read_text())
    }


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_all_has_no_duplicates_and_is_sorted(module: str) -> None:
    names = importlib.import_module(module).__all__
    assert len(names) == len(set(names))
    assert names == sorted(names)


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_star_import_gives_exactly_all(module: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from {module} import *", namespace)
    del namespace["__builtins__"]
    assert sorted(namespace) == sorted(importlib.import_module(module).__all__)


@pytest.mark.parametrize("public", public_ids())
def test_exported_name_imports_and_has_a_docstring(public: str, package: griffe.Module) -> None:
    module, _, name = public.rpartition(".")
    getattr(importlib.import_module(module), name)  # raises if __all__ names nothing
    if public in UNDOCUMENTED_VALUES:
        return
    target = target_of(package, public)
    docstring = target.docstring.value.strip() if target.docstring else ""
    assert docstring, f"{public} (defined as {target.path}) has no docstring"


def target_of(package: griffe.Module, public: str) -> griffe.Object:
    obj = package[public.removeprefix("txflow.")]
    return obj.final_target if isinstance(obj, griffe.Alias) else obj


@pytest.mark.parametrize("public", [p for p in public_ids() if p not in UNDOCUMENTED_VALUES])
def test_public_methods_have_docstrings(public: str, package: griffe.Module) -> None:
    # mkdocstrings leaves out a member without a docstring, so it would be missing from the
    # reference; an override of a documented base method (a Transport's) shows the base's.
    target = target_of(package, public)
    if not isinstance(target, griffe.Class | griffe.Module):
        return
    bases = target.mro() if isinstance(target, griffe.Class) else []
    missing = [
        name
        for name, member in target.members.items()
        if not name.startswith("_")
        and not member.is_alias
        and member.is_function
        and not member.docstring
        and not any(name in base.members and base.members[name].docstring for base in bases)
    ]
    assert not missing, f"{public}: public members without a docstring: {missing}"


@pytest.mark.parametrize("public", public_ids())
def test_exported_name_is_in_the_api_reference(public: str) -> None:
    if public in UNDOCUMENTED_VALUES:
        assert public in (REFERENCE / "index.md").read_text()
    else:
        assert public in reference_entries(), f"add `::: {public}` to a page in docs/reference/"


def test_api_reference_names_only_public_paths() -> None:
    # A private path (txflow._app.TxFlow) would break when the module moves; a public one
    # keeps working wherever the implementation lives.
    entries = reference_entries()
    public = set(public_ids())
    private = {name: page.name for name, page in entries.items() if name not in public}
    assert not private, f"reference entries that are not exported names: {private}"


def private_imports(source: str, filename: str = "<source>") -> set[str]:
    """The txflow modules or names that `source` imports beyond the public API."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found.update(
                alias.name
                for alias in node.names
                if alias.name.startswith("txflow.") and alias.name not in PUBLIC_MODULES
            )
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module in PUBLIC_MODULES:
                exports = importlib.import_module(node.module).__all__
                found.update(
                    f"{node.module}.{alias.name}"
                    for alias in node.names
                    if alias.name != "*" and alias.name not in exports
                )
            elif node.module.startswith("txflow."):
                found.add(node.module)
    return found


SOURCES = sorted(
    path.relative_to(ROOT).as_posix()
    for folder in ("examples", "benchmarks")
    for path in (ROOT / folder).rglob("*.py")
)


@pytest.mark.parametrize("source", SOURCES)
def test_examples_and_benchmarks_import_only_public_names(source: str) -> None:
    allowed = {module for file, module in ALLOWED_PRIVATE_IMPORTS if file == source}
    private = private_imports((ROOT / source).read_text(), source) - allowed
    assert not private, f"{source} imports {sorted(private)}; use what txflow exports"


def test_allowed_private_imports_are_still_there() -> None:
    # So the list shrinks with the code: an entry whose import went away fails here.
    for source, module in ALLOWED_PRIVATE_IMPORTS:
        found = private_imports((ROOT / source).read_text(), source)
        assert module in found, f"drop {(source, module)} from ALLOWED_PRIVATE_IMPORTS"


def test_private_imports_are_found() -> None:
    source = (
        "import txflow, txflow.testing\n"
        "import txflow.store._tables\n"
        "from txflow import TxFlow, store\n"
        "from txflow.testing import wait_until, memory\n"
        "from txflow.rabbit import RabbitTransport\n"
        "def late():\n"
        "    from txflow._app import DEFAULT_DB_POOL_SIZE\n"
    )
    assert private_imports(source) == {
        "txflow.store._tables",
        "txflow.store",
        "txflow.testing.memory",
        "txflow.rabbit",
        "txflow._app",
    }
