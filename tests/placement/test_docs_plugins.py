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
