"""The persisted form of a RecoverableState: the model's own dump, versioned in metadata.

Under its key, a RecoverableState stores what crawlee stores: the model's JSON dump
(``model_dump(mode="json", by_alias=True)``) as the checkpoint's data, so the record is
the same document a crawlee user would find. The schema version goes in the
checkpoint's metadata (``{"kind": "statekeep.RecoverableState", "format": 2,
"schema_version": N}``).

A storage keeps a JSON *object* as data, so a ``RootModel`` whose dump is not an object
(``RootModel[list[int]]``, ``RootModel[int]``) is stored as ``{"root": <dump>}`` and
marked ``"root": "wrapped"`` in the metadata. A dict-rooted model is stored bare, exactly
as crawlee does.

Records of the first statekeep form, ``{"schema_version": N, "state": {...}}`` with no
``format`` in their metadata, are still read. A record with no statekeep metadata at all
(a crawlee record copied over) is read as schema version 1.

Reading runs the application's migrations from the persisted version up to the current
one and validates the result as the model; every failure is a typed error naming the key
and, when there is one, the field.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeGuard, TypeVar

import pydantic
import pydantic_core

from statekeep.errors import StateValidationError, StateVersionError

__all__ = ["FORMAT", "KIND", "Migration", "check_schema", "decode_state", "encode_state"]

TModel = TypeVar("TModel", bound=pydantic.BaseModel)

Migration = Callable[[Any], Any]
"""Turns the persisted value of schema version ``v`` into that of version ``v + 1``.

For an ordinary model the value is the state dict; for a ``RootModel`` it is the root's
JSON value (a list, a number, ...).
"""

KIND = "statekeep.RecoverableState"
FORMAT = 2  # the model's own dump as data; 1 was the {"schema_version", "state"} envelope
_WRAP_KEY = "root"


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


def encode_state(
    value: pydantic.BaseModel, schema_version: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The data and metadata persisted for ``value``.

    The data is the model's JSON dump by alias (wrapped as ``{"root": dump}`` when the
    dump is not an object); the metadata carries the schema version.
    """
    dump = value.model_dump(mode="json", by_alias=True)
    metadata: dict[str, Any] = {"kind": KIND, "format": FORMAT, "schema_version": schema_version}
    if isinstance(dump, dict):
        return dump, metadata
    metadata[_WRAP_KEY] = "wrapped"
    return {_WRAP_KEY: dump}, metadata


def decode_state(
    key: str,
    data: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
    model: type[TModel],
    schema_version: int,
    migrations: Mapping[int, Migration],
) -> TModel:
    """Migrate and validate a persisted record into a fresh ``model`` instance.

    ``metadata`` is the checkpoint's metadata (None when the storage has none for it).

    Raises:
        StateVersionError: the record's version is newer than ``schema_version``, or a
            migration step it needs is missing.
        StateValidationError: the record is malformed, a migration failed or returned
            something that is not a dict for an ordinary model, or the result does not
            validate.
    """
    where = f"persisted state {key!r}"
    version, state = _unpack(where, key, data, metadata or {})
    if version > schema_version:
        raise StateVersionError(
            f"{where} has schema version {version}, newer than this application's "
            f"{schema_version}; upgrade the application or migrate the data",
            key=key,
        )
    rooted = issubclass(model, pydantic.RootModel)
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
        if not rooted and not isinstance(migrated, dict):
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
    except (ValueError, TypeError, RecursionError) as exc:  # not JSON at all
        raise StateValidationError(f"{where} is not a JSON value: {exc}", key=key) from exc


def _unpack(
    where: str, key: str, data: Mapping[str, Any], metadata: Mapping[str, Any]
) -> tuple[int, Any]:
    """The persisted schema version and the value the model is validated from."""
    if metadata.get("format") is None:
        if set(data) == {"schema_version", "state"}:  # the first form: an envelope
            version, state = data["schema_version"], data["state"]
            if not _is_int(version) or version < 1 or not isinstance(state, dict):
                raise StateValidationError(
                    f"{where} is a malformed RecoverableState envelope: expected an int "
                    f"'schema_version' >= 1 and a dict 'state'",
                    key=key,
                )
            return version, state
        version = metadata.get("schema_version", 1)  # no statekeep metadata: crawlee's
    else:
        version = metadata.get("schema_version")
    if not _is_int(version) or version < 1:
        raise StateValidationError(
            f"{where} has a malformed schema version in its metadata: {version!r}", key=key
        )
    if metadata.get(_WRAP_KEY) == "wrapped":
        if set(data) != {_WRAP_KEY}:
            raise StateValidationError(
                f"{where} is marked as a wrapped root value but its data has keys "
                f"{sorted(data)}, not just {_WRAP_KEY!r}",
                key=key,
            )
        return version, data[_WRAP_KEY]
    return version, dict(data)


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
