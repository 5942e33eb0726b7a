"""Registries: lazy built-ins by import path, entry-point plugins, clear errors; nothing heavy at import."""
from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import EntryPoint

import pytest

import gppf.registry
from gppf.registry import Registry, RegistryError


def test_builtins_resolve_lazily_by_import_path():
    reg: Registry = Registry("codec", builtins={"dumps": "json:dumps", "broken": "json:nope"})
    assert reg.names() == ["broken", "dumps"] and "dumps" in reg and len(reg) == 2
    assert reg.get("dumps") is json.dumps
    with pytest.raises(RegistryError, match="codec 'broken': cannot load 'json:nope'"):
        reg.get("broken")
    with pytest.raises(RegistryError, match=r"unknown codec 'dump'; did you mean 'dumps'\?"):
        reg.get("dump")
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("broken", json.loads)  # a lazily listed name is taken even before it is imported


def test_entry_points_add_names_and_clashes_are_errors(monkeypatch):
    eps = [EntryPoint(name="loads", value="json:loads", group="test.group")]
    monkeypatch.setattr(gppf.registry, "entry_points", lambda group: [e for e in eps if e.group == group])
    reg: Registry = Registry("codec", builtins={"dumps": "json:dumps"}, group="test.group", convert=lambda f: f)
    assert reg.names() == ["dumps", "loads"]
    assert reg.get("loads") is json.loads

    eps.append(EntryPoint(name="dumps", value="pickle:dumps", group="test.group"))
    clash: Registry = Registry("codec", builtins={"dumps": "json:dumps"}, group="test.group")
    with pytest.raises(RegistryError, match=r"entry point 'dumps = pickle:dumps'.*already registered"):
        clash.names()


def test_task_type_classes_are_instantiated():
    class Thing:
        pass

    reg: Registry = Registry("task type", convert=gppf.registry._instantiate)
    reg.add("thing", Thing)
    assert isinstance(reg.get("thing"), Thing)


def test_listing_imports_no_builtin_module():
    code = (
        "import sys; from gppf.registry import TASK_TYPES, READERS, BACKBONES; "
        "n = len(TASK_TYPES.names()) + len(READERS.names()) + len(BACKBONES.names()); "
        "print(n, sorted(m for m in sys.modules if m.startswith('gppf.') or m == 'torch'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "19 ['gppf.registry']"
