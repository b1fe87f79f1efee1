"""The test-server fixtures' switch: under CI=true a missing server fails, else it skips."""

from __future__ import annotations

from pathlib import Path

import pytest

import servers


class TestUnavailable:
    """servers.unavailable fails under CI=true and skips elsewhere, giving the reason."""

    def test_fails_under_ci(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CI", "true")
        with pytest.raises(pytest.fail.Exception, match="no weed here"):
            servers.unavailable("no weed here")

    @pytest.mark.parametrize("value", [None, "", "false"])
    def test_skips_elsewhere(self, monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception, match="no weed here"):
            servers.unavailable("no weed here")

    def test_a_missing_postgresql_says_how_to_install_it(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.setattr(servers.glob, "glob", lambda pattern: [])
        with pytest.raises(servers.ServerUnavailable, match="apt-get install -y postgresql"):
            servers.PostgresServer(tmp_path)

    def test_free_ports_are_distinct(self) -> None:
        ports = servers.free_ports(12)
        assert len(set(ports)) == 12
