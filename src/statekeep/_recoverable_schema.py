"""The persisted form of a RecoverableState: a versioned envelope, migrations, validation.

A RecoverableState stores, under its key, ``{"schema_version": N, "state": {...}}``
where ``state`` is the model dumped to JSON (by alias). Reading it back checks the
envelope, runs the application's migrations from version N up to the current one, and
validates the result as the model; every failure is a typed error naming the key and,
when there is one, the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeGuard, TypeVar

import pydantic
import pydantic_core

from statekeep.errors import StateValidationError, StateVersionError

__all__ = ["Migration", "check_schema", "decode_state", "encode_state"]

TModel = TypeVar("TModel", bound=pydantic.BaseModel)

Migration = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns the state dict of schema version ``v`` into the state dict of version ``v + 1``."""


def check_schema(schema_version: int, migrations: Mapping[int, Migration]) -> None:
    """Reject a schema version or migration table that could never work.

    Raises:
        TypeError: ``schema_version`` or a migration key is not an int, or a migration
            is not callable.
        ValueError: ``schema_version`` is below 1, or a migration starts from a version
            outside ``1 .. schema_version - 1``.
    """
    if not _is_int(schema_version):
        raise TypeError(f"schema_version must be an int, not {type(schema_version).__name__}")
    if schema_version < 1:
        raise ValueError(f"schema_version must be >= 1, not {schema_version}")
    if not isinstance(migrations, Mapping):
        raise TypeError(f"migrations must be a mapping, not {type(migrations).__name__}")
    for start, migrate in migrations.items():
        if not _is_int(start):
            raise TypeError(f"migration key {start!r} must be an int (the version it starts from)")
        if not 1 <= start < schema_version:
            raise ValueError(
                f"migration from version {start} is outside 1..{schema_version - 1}: "
                f"the current schema_version is {schema_version}"
            )
        if not callable(migrate):
            raise TypeError(f"migration from version {start} is not callable: {migrate!r}")


def encode_state(value: pydantic.BaseModel, schema_version: int) -> dict[str, Any]:
    """The envelope persisted for ``value``: its JSON dump tagged with the schema version."""
    return {
        "schema_version": schema_version,
        "state": value.model_dump(mode="json", by_alias=True),
    }


def decode_state(
    key: str,
    record: Mapping[str, Any],
    model: type[TModel],
    schema_version: int,
    migrations: Mapping[int, Migration],
) -> TModel:
    """Migrate and validate a persisted envelope into a fresh ``model`` instance.

    Raises:
        StateVersionError: the record's version is newer than ``schema_version``, or a
            migration step it needs is missing.
        StateValidationError: the record is not an envelope, a migration failed or
            returned something else than a dict, or the result does not validate.
    """
    where = f"persisted state {key!r}"
    version = record.get("schema_version")
    state = record.get("state")
    if not _is_int(version) or not isinstance(state, dict):
        raise StateValidationError(
            f"{where} is not a RecoverableState record: expected an int 'schema_version' "
            f"and a dict 'state', found keys {sorted(record)}",
            key=key,
        )
    if version > schema_version:
        raise StateVersionError(
            f"{where} has schema version {version}, newer than this application's "
            f"{schema_version}; upgrade the application or migrate the data",
            key=key,
        )
    for start in range(version, schema_version):
        migrate = migrations.get(start)
        if migrate is None:
            raise StateVersionError(
                f"{where} has schema version {version} but there is no migration from "
                f"version {start} to {start + 1}",
                key=key,
            )
        try:
            migrated = migrate(state)
        except Exception as exc:
            raise StateValidationError(
                f"{where}: migration from version {start} to {start + 1} failed: {exc!r}",
                key=key,
            ) from exc
        if not isinstance(migrated, dict):
            raise StateValidationError(
                f"{where}: migration from version {start} returned "
                f"{type(migrated).__name__}, not a dict",
                key=key,
            )
        state = migrated
    try:
        return model.model_validate_json(pydantic_core.to_json(state))
    except pydantic.ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        field = ".".join(str(part) for part in first["loc"]) or None
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise StateValidationError(
            f"{where} (schema version {schema_version}) does not validate as "
            f"{model.__name__}: field {field!r}: {first['msg']}{more}",
            key=key,
            field=field,
        ) from exc


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
