"""docs/hooks.py keeps private names out of the rendered API page (mkdocs not needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

HOOKS = Path(__file__).resolve().parents[1] / "docs" / "hooks.py"


@pytest.fixture(scope="module")
def hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("statekeep_docs_hooks", HOOKS)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bases(*titles: str) -> str:
    names = ", ".join(
        f'<code><span title="{t}">{t.rsplit(".", 1)[-1]}</span></code>' for t in titles
    )
    return f'<p class="doc doc-class-bases">\n              Bases: {names}</p>'


class TestPrivateNames:
    """What mkdocstrings renders from private code is dropped or shown by its value."""

    def test_a_private_mixin_base_is_dropped(self, hooks: ModuleType) -> None:
        page = "<h2>KeepAny</h2>" + bases("statekeep._order._Combinable") + "<p>Keep</p>"
        assert hooks.on_post_page(page) == "<h2>KeepAny</h2><p>Keep</p>"

    def test_public_bases_stay(self, hooks: ModuleType) -> None:
        page = bases("typing.Protocol") + bases("statekeep.errors.StatekeepError", "ValueError")
        assert hooks.on_post_page(page) == page

    def test_the_private_default_shows_its_value(self, hooks: ModuleType) -> None:
        from statekeep import _keeper

        signature = '<span class="o">=</span> <span class="n">_DEFAULT_MAX_KEEP</span>'
        title = "statekeep._keeper._DEFAULT_MAX_KEEP"
        table = f'<code><span title="{title}">_DEFAULT_MAX_KEEP</span></code>'
        out = hooks.on_post_page(signature + table)
        assert "_DEFAULT_MAX_KEEP" not in out
        assert out.count(f'<span class="mi">{int(_keeper._DEFAULT_MAX_KEEP)}</span>') == 2
