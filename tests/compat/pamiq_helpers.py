# Origin: pamiq-core 0.4.0 (sdist pamiq_core-0.4.0.tar.gz), tests/helpers.py,
# the function check_log_message only. Copyright (c) 2024 MLShukai, MIT License
# (https://github.com/MLShukai/pamiq-core/blob/main/LICENSE).
# Changed for statekeep: the three platform skip helpers beside it are left out (no test
# here uses them); a ruff noqa line for its long docstring line; the function's code is
# as in pamiq-core.
# ruff: noqa: E501
"""pamiq-core's log assertion helper, used by its tests brought in here."""

import re

import pytest


def check_log_message(
    expected_log_message: str, log_level: str | None, caplog: pytest.LogCaptureFixture
):
    """Check if the expected log message is in the log messages.

    Args:
        expected_log_message: expected log message pattern string
        log_level: log level of the expected log message.
        caplog: caplog fixture.

    Raises:
        AssertionError: if the expected log message is not in the log messages of specified log level.
    """

    try:
        re.compile(expected_log_message)
    except re.error:
        expected_log_message = re.escape(expected_log_message)

    if log_level:
        error_level_log_messages = [
            record.message for record in caplog.records if record.levelname == log_level
        ]
    else:
        # if no log_level is specified, then check all log messages
        error_level_log_messages = [record.message for record in caplog.records]

    assert any(re.match(expected_log_message, message) for message in error_level_log_messages)
