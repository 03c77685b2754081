"""docs/plugins.md documents every hook, and its complete example works as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from meshd import config as configmod
from meshd.placement import hookspecs, plugins
from meshd.placement import rules as placement
from meshd.placement.snapshot import GB, MeshView, NodeView

DOC = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


@pytest.fixture(scope="module")
def doc():
    return DOC.read_text()


def section(doc, heading):
    start = doc.index(heading)
    nxt = doc.find("\n## ", start + len(heading))
    return doc[start: nxt if nxt != -1 else len(doc)]


def documented_hooks(doc):
    return re.findall(r"^### (meshd_\w+)\s*$", doc, flags=re.M)


@pytest.mark.parametrize("hook", hookspecs.hook_names())
def test_every_hook_has_a_section_in_the_docs(doc, hook):
    assert hook in documented_hooks(doc), f"docs/plugins.md has no '### {hook}' section"


def test_the_docs_document_no_hook_that_does_not_exist(doc):
    assert set(documented_hooks(doc)) <= set(hookspecs.hook_names())


@pytest.mark.parametrize("hook", hookspecs.hook_names())
def test_every_documented_hook_lists_its_arguments(doc, hook):
    import inspect

    start = doc.index(f"### {hook}")
    end = doc.find("\n### ", start + 1)
    text = doc[start:end]
    for arg in inspect.signature(getattr(hookspecs, hook)).parameters:
        assert f"`{arg}" in text or f"{arg}," in text or f"{arg})" in text, f"{hook}: {arg} missing"


@pytest.fixture
def site_rules(doc, tmp_path):
    """The complete example, saved and configured exactly as the docs say."""
    example = section(doc, "## A complete example")
    code = re.search(r"```python\n(.*?)```", example, flags=re.S).group(1)
    toml_text = re.search(r"```toml\n(.*?)```", example, flags=re.S).group(1)
    plugins_d = tmp_path / "plugins.d"
    plugins_d.mkdir()
    (plugins_d / "site_rules.py").write_text(code)
    (tmp_path / "meshd.toml").write_text(toml_text)
    cfg = configmod.load(str(tmp_path / "meshd.toml"))
    return plugins.load(cfg, plugins_dir=str(plugins_d), entry_points=[], search_dirs=[])


def test_the_complete_example_loads_from_the_plugins_dir(site_rules):
    assert [p.name for p in site_rules.ordered()] == ["site_rules", "default"]


def test_the_complete_example_refuses_downloads_over_its_limit(site_rules):
    me = NodeView("me", vram_bytes=80 * GB)
    big = placement.allow_download("big", 30 * GB, me, policy=site_rules)
    small = placement.allow_download("small", 10 * GB, me, policy=site_rules)
    assert (big.allowed, big.decided_by) == (False, "site_rules")
    assert (small.allowed, small.decided_by) == (True, "default")


def test_the_complete_example_avoids_draining_hosts(site_rules):
    hosts = (NodeView("3f9c2a71d0e4b8a6", role="host"), NodeView("ffff", role="host"))
    mesh = MeshView("ffff", hosts)
    chosen = {placement.choose_host("m", f"c{i}", hosts, mesh, policy=site_rules) for i in range(40)}
    assert chosen == {"ffff"}


def test_the_complete_example_rejects_bad_settings(doc, tmp_path):
    example = section(doc, "## A complete example")
    code = re.search(r"```python\n(.*?)```", example, flags=re.S).group(1)
    path = tmp_path / "site_rules.py"
    path.write_text(code)
    cfg = configmod.Config().replace(
        "policy", plugins=[str(path)], settings={"site_rules": {"max_download_gb": "lots"}}
    )
    problems = plugins.check(cfg, plugins_dir=None, entry_points=[], search_dirs=[])
    assert problems == [
        f"[policy.site_rules] max_download_gb: expected a number of GiB >= 0, got 'lots' (plugin site_rules, {path})"
    ]


# -- (f) every [policy] key, (h) every snippet complete --------------------------------------------


def python_snippets(doc):
    return re.findall(r"```python\n(.*?)```", doc, flags=re.S)


def undefined_names(code: str) -> set[str]:
    """Names a snippet uses that it neither defines, imports nor gets from builtins."""
    import builtins
    import symtable

    top = symtable.symtable(code, "<snippet>", "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    known = bound | set(dir(builtins))
    missing: set[str] = set()

    def walk(table):
        for sym in table.get_symbols():
            free_here = table.get_type() == "module" and not (sym.is_assigned() or sym.is_imported())
            if sym.is_referenced() and (sym.is_global() or free_here) and sym.get_name() not in known:
                missing.add(sym.get_name())
        for child in table.get_children():
            walk(child)

    walk(top)
    return missing


def test_the_undefined_name_check_catches_a_missing_import():
    assert undefined_names("def t():\n    return NodeView('a'), GB\n") == {"NodeView", "GB"}
    assert undefined_names("from x import GB\ndef t(a):\n    return a * GB\n") == set()


def test_every_python_snippet_imports_every_name_it_uses(doc):
    snippets = python_snippets(doc)
    assert len(snippets) >= 4
    for code in snippets:
        code = code.replace("    ...\n", "    pass\n")
        assert undefined_names(code) == set(), code


def test_the_testing_snippets_pass_as_written(doc, tmp_path, monkeypatch):
    """The docs' own tests of site_rules, run against the docs' own site_rules."""
    import sys

    example = re.search(r"```python\n(.*?)```", section(doc, "## A complete example"), flags=re.S).group(1)
    (tmp_path / "site_rules.py").write_text(example)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "site_rules", raising=False)
    unit, through = python_snippets(section(doc, "## Testing a plugin"))
    through = through.replace("/path/to/site_rules.py", str(tmp_path / "site_rules.py"))
    ran = []
    for code in (unit, through):
        namespace: dict = {"__name__": "docs_snippet"}
        exec(compile(code, "docs/plugins.md", "exec"), namespace)
        for name, fn in namespace.items():
            if name.startswith("test_"):
                work = tmp_path / name
                work.mkdir()
                if fn.__code__.co_argcount:
                    fn(work)
                else:
                    fn()
                ran.append(name)
    assert ran == ["test_refuses_downloads_over_the_limit", "test_avoids_draining_hosts", "test_through_meshd"]
    sys.modules.pop("site_rules", None)


def test_every_policy_key_is_documented(doc):
    import dataclasses

    configuring = section(doc, "## Configuring")
    for f in dataclasses.fields(configmod.PolicyConfig):
        if f.name == "settings":
            continue  # the [policy.<name>] tables, documented under Settings
        assert f"\n{f.name} = " in configuring, f"[policy] {f.name} is missing from docs/plugins.md"
