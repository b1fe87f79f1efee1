"""The public face of statekeep: what __all__ exports, and that all of it is documented."""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

import statekeep
import statekeep.errors
import statekeep.storage

ROOT = Path(__file__).resolve().parent.parent
API_PAGE = ROOT / "docs" / "api.md"
CHANGELOG = ROOT / "CHANGELOG.md"

# Update this set together with src/statekeep/__init__.py (and CHANGELOG.md): a name that
# appears or disappears here is a change to the public API.
EXPECTED = {
    "BaseCheckpointStorage",
    "CheckpointInfo",
    "CheckpointStorage",
    "CorruptCheckpointError",
    "CorruptStateError",
    "ExecutionContext",
    "FileCheckpointStorage",
    "KeepAny",
    "KeepBest",
    "KeepEvery",
    "KeepLatest",
    "LatestStatesKeeper",
    "MemoryCheckpointStorage",
    "MissingComponentsError",
    "PersistentStateMixin",
    "PostgresCheckpointStorage",
    "RecoverableState",
    "RetentionPolicy",
    "S3CheckpointStorage",
    "SQLiteCheckpointStorage",
    "StateExistsError",
    "StateInfo",
    "StateManager",
    "StateStore",
    "StateValidationError",
    "StateVersionError",
    "StatekeepError",
    "StorageError",
    "load_pickle",
    "save_pickle",
    "verify_state",
}

_DIRECTIVE = re.compile(r"^:::\s*(?P<target>[\w.]+)\s*$")


def documented_names(page: str) -> dict[str, set[str] | None]:
    """What each ``::: module`` block of an API page renders.

    Maps a module to the member names its block lists explicitly, or to None when the
    block leaves ``members`` unspecified (mkdocstrings then renders all of ``__all__``).
    A block for a single object (``::: statekeep.StateStore``) maps its module to that
    name. ``members: false`` renders none.
    """
    found: dict[str, set[str] | None] = {}
    lines = page.splitlines()
    for i, line in enumerate(lines):
        match = _DIRECTIVE.match(line)
        if match is None:
            continue
        target = match["target"]
        options = []
        for following in lines[i + 1 :]:
            if following and not following.startswith("    "):
                break
            options.append(following.strip())
        members: set[str] | None = None
        for j, option in enumerate(options):
            if not option.startswith("members:"):
                continue
            value = option.removeprefix("members:").strip()
            if value == "false":
                members = set()
            elif value.startswith("["):
                members = {m.strip() for m in value.strip("[]").split(",") if m.strip()}
            else:
                members = set()
                for item in options[j + 1 :]:
                    if not item.startswith("- "):
                        break
                    members.add(item.removeprefix("- ").strip())
        if target.startswith("statekeep.") and target.rsplit(".", 1)[-1][:1].isupper():
            module, name = target.rsplit(".", 1)
            previous = found.get(module, set())
            if previous is not None:
                found[module] = previous | {name}
            continue
        if members is None or (target in found and found[target] is None):
            found[target] = None
        else:
            found[target] = (found.get(target) or set()) | members
    return found


class TestAll:
    """statekeep.__all__ is the pinned, sorted, importable public API."""

    def test_matches_the_expected_names(self) -> None:
        """__all__ holds exactly the names this test pins, no more and no fewer."""
        exported = set(statekeep.__all__)
        assert exported - EXPECTED == set(), "new public names: add them to EXPECTED"
        assert EXPECTED - exported == set(), "public names removed from __all__"

    def test_is_sorted_without_duplicates(self) -> None:
        """__all__ is sorted and lists each name once."""
        assert statekeep.__all__ == sorted(set(statekeep.__all__))

    @pytest.mark.parametrize("name", sorted(EXPECTED))
    def test_every_name_is_importable(self, name: str) -> None:
        """Each exported name resolves to a real object of the package."""
        namespace: dict[str, object] = {}
        exec(f"from statekeep import {name}", namespace)
        assert namespace[name] is getattr(statekeep, name)
        assert getattr(namespace[name], "__module__", "").startswith("statekeep")

    @pytest.mark.parametrize("name", sorted(EXPECTED))
    def test_every_name_has_its_own_docstring(self, name: str) -> None:
        """Each exported object carries a docstring of its own (not one generated or inherited)."""
        obj = getattr(statekeep, name)
        doc = (obj.__doc__ if inspect.isfunction(obj) else vars(obj).get("__doc__")) or ""
        assert doc.strip(), f"{name} has no docstring"
        assert not doc.startswith(f"{name}("), f"{name} only has the dataclass-generated docstring"

    def test_subpackages_are_re_exported(self) -> None:
        """Every public name of statekeep.errors and statekeep.storage is also top-level."""
        for module in (statekeep.errors, statekeep.storage):
            missing = set(module.__all__) - set(statekeep.__all__)
            assert missing == set(), f"{module.__name__} exports {missing} but statekeep does not"
            for name in module.__all__:
                assert getattr(module, name) is getattr(statekeep, name)


class TestDocumentation:
    """Every public name is rendered by the API reference and recorded in the changelog."""

    def test_api_page_renders_every_name(self) -> None:
        """docs/api.md renders all of __all__ (a bare ``::: statekeep``) or lists each name."""
        blocks = documented_names(API_PAGE.read_text(encoding="utf-8"))
        assert "statekeep" in blocks, "docs/api.md has no ::: statekeep block"
        rendered = blocks["statekeep"]
        if rendered is not None:
            assert set(statekeep.__all__) - rendered == set()

    @pytest.mark.parametrize("module", ["statekeep.remote", "statekeep.testing"])
    def test_api_page_renders_every_name_of(self, module: str) -> None:
        """docs/api.md renders every name of the public subpackages that statekeep does not
        re-export."""
        names = set(importlib.import_module(module).__all__)
        blocks = documented_names(API_PAGE.read_text(encoding="utf-8"))
        assert module in blocks, f"docs/api.md has no ::: {module} block"
        block = blocks[module]
        assert names - (names if block is None else block) == set()

    def test_changelog_records_every_name(self) -> None:
        """Each public name (statekeep, statekeep.remote, statekeep.testing) appears in
        CHANGELOG.md's [Unreleased] section."""
        changelog = CHANGELOG.read_text(encoding="utf-8")
        unreleased = changelog.split("## [Unreleased]", 1)[1].split("\n## [", 1)[0]
        public = {
            *statekeep.__all__,
            *importlib.import_module("statekeep.remote").__all__,
            *importlib.import_module("statekeep.testing").__all__,
        }
        missing = {n for n in public if not re.search(rf"\b{n}\b", unreleased)}
        assert missing == set(), f"CHANGELOG.md [Unreleased] does not mention {sorted(missing)}"


class TestDocumentedNamesParser:
    """The parser of docs/api.md reads the three ways a block can choose its members."""

    def test_bare_module_block_renders_everything(self) -> None:
        """A block without a members option maps to None (all of __all__)."""
        page = "::: statekeep\n    options:\n      heading_level: 2\n"
        assert documented_names(page) == {"statekeep": None}

    def test_members_list_and_false(self) -> None:
        """Inline lists, dash lists and ``members: false`` give exactly those names."""
        page = (
            "::: statekeep\n    options:\n      members: [StateStore, StateInfo]\n\n"
            "::: statekeep.errors\n    options:\n      members: false\n\n"
            "::: statekeep.storage\n    options:\n      members:\n"
            "        - CheckpointInfo\n"
        )
        assert documented_names(page) == {
            "statekeep": {"StateStore", "StateInfo"},
            "statekeep.errors": set(),
            "statekeep.storage": {"CheckpointInfo"},
        }

    def test_single_object_blocks_add_up(self) -> None:
        """``::: statekeep.Name`` blocks document those names of their module."""
        page = "::: statekeep.StateStore\n\n::: statekeep.LatestStatesKeeper\n"
        assert documented_names(page) == {"statekeep": {"StateStore", "LatestStatesKeeper"}}
