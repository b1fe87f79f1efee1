"""S3 and PostgreSQL checkpoint cases, each against the least code doing the same.

The servers are the test suite's (``tests/servers.py``: SeaweedFS and PostgreSQL on
127.0.0.1, started here and stopped after the suites). Each statekeep case has a
baseline using the same client or connection in the same run: a raw ``put_object`` /
``get_object`` of the same value as JSON, and a raw upsert / select of one row (the JSON
encoding or decoding included in both: the least code that saves or loads a dict). Listing is
timed at two sizes, the smaller being the baseline of the larger.
"""

from __future__ import annotations

import json
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _harness import Case, Suite, timed

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import servers
from statekeep import PostgresCheckpointStorage, S3CheckpointStorage
from statekeep.storage._envelope import pack


def _value(size: int) -> dict[str, Any]:
    return {"step": 1, "blob": "x" * max(0, size - 24)}


def _repeat(size: int, repeat: int) -> int:
    """Calls per sample: ten times more for small values, whose calls take tens of
    microseconds (PostgreSQL) to a few milliseconds, so one sample is not one jitter."""
    return repeat * 10 if size <= 64 << 10 else repeat


def _s3_cases(server: servers.S3Server, sizes: dict[str, int], repeat: int) -> list[Case]:
    client = server.client()
    bucket = server.new_bucket()
    storage = S3CheckpointStorage(f"s3://{bucket}/bench", client=client)
    cases = []
    for label, size in sizes.items():
        value = _value(size)
        body = json.dumps(value, separators=(",", ":")).encode()
        key = f"raw/{label}"
        reps = _repeat(size, repeat)
        storage.save(f"s-{label}", value)
        client.put_object(Bucket=bucket, Key=key, Body=body)

        def save(v: dict[str, Any] = value, sid: str = f"s-{label}", n: int = reps) -> float:
            return timed(lambda: storage.save(sid, v), n)

        def load(sid: str = f"s-{label}", n: int = reps) -> float:
            return timed(lambda: storage.load(sid), n)

        def put(k: str = key, v: dict[str, Any] = value, n: int = reps) -> float:
            def op() -> object:
                body = json.dumps(v, separators=(",", ":")).encode()
                return client.put_object(Bucket=bucket, Key=k, Body=body)

            return timed(op, n)

        def get(k: str = key, n: int = reps) -> float:
            def op() -> object:
                return json.loads(client.get_object(Bucket=bucket, Key=k)["Body"].read())

            return timed(op, n)

        cases += [
            Case(f"s3_raw_put_{label}", f"json + raw put_object {label}", put, nbytes=size),
            Case(f"s3_save_{label}", f"S3 save {label}", save, f"s3_raw_put_{label}", size),
            Case(f"s3_raw_get_{label}", f"raw get_object + json {label}", get, nbytes=size),
            Case(f"s3_load_{label}", f"S3 load {label}", load, f"s3_raw_get_{label}", size),
        ]
    return cases


def _pg_cases(server: servers.PostgresServer, sizes: dict[str, int], repeat: int) -> list[Case]:
    import psycopg

    conninfo = server.new_database()
    storage = PostgresCheckpointStorage(conninfo)
    conn = psycopg.connect(conninfo, autocommit=True)
    conn.execute("CREATE TABLE raw (k text PRIMARY KEY, v bytea NOT NULL)")
    cases = []
    for label, size in sizes.items():
        value = _value(size)
        body = json.dumps(value, separators=(",", ":")).encode()
        reps = _repeat(size, repeat)
        storage.save(f"s-{label}", value)
        upsert = "INSERT INTO raw VALUES (%s, %s) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v"
        conn.execute(upsert, (label, body))

        def save(v: dict[str, Any] = value, sid: str = f"s-{label}", n: int = reps) -> float:
            return timed(lambda: storage.save(sid, v), n)

        def load(sid: str = f"s-{label}", n: int = reps) -> float:
            return timed(lambda: storage.load(sid), n)

        def put(k: str = label, v: dict[str, Any] = value, q: str = upsert, n: int = reps) -> float:
            def op() -> object:
                return conn.execute(q, (k, json.dumps(v, separators=(",", ":")).encode()))

            return timed(op, n)

        def get(k: str = label, n: int = reps) -> float:
            def select() -> object:
                row = conn.execute("SELECT v FROM raw WHERE k = %s", (k,)).fetchone()
                return json.loads(bytes(row[0])) if row else None

            return timed(select, n)

        cases += [
            Case(f"pg_raw_upsert_{label}", f"json + raw upsert {label}", put, nbytes=size),
            Case(
                f"pg_save_{label}", f"PostgreSQL save {label}", save, f"pg_raw_upsert_{label}", size
            ),
            Case(f"pg_raw_select_{label}", f"raw select + json {label}", get, nbytes=size),
            Case(
                f"pg_load_{label}", f"PostgreSQL load {label}", load, f"pg_raw_select_{label}", size
            ),
        ]

    def close() -> None:
        conn.close()
        storage.close()

    cases[-1].close = close
    return cases


def _listing_cases(
    s3: servers.S3Server, pg: servers.PostgresServer, counts: list[int]
) -> list[Case]:
    import psycopg

    cases: list[Case] = []
    client = s3.client(pool=16)  # 16 parallel header reads, as the storage's default client
    conninfo = pg.new_database()
    for count in counts:
        bucket = s3.new_bucket()
        s3_storage = S3CheckpointStorage(f"s3://{bucket}", client=client)
        now = datetime.now(timezone.utc)
        for n in range(count):  # setup: raw PUTs of real checkpoint blobs
            key = f"s{n}"
            client.put_object(
                Bucket=bucket, Key=s3_storage._name(key), Body=pack(key, b"{}", b"{}", now)
            )
        pg_storage = PostgresCheckpointStorage(conninfo, table=f"list_{count}")
        with psycopg.connect(conninfo, autocommit=True) as conn, conn.cursor() as cur:
            rows = [(f"s{n}", 2, zlib.crc32(b"{}"), "{}", b"{}") for n in range(count)]
            cur.executemany(
                f"INSERT INTO list_{count} (session_id, saved_at, size_bytes, crc32, metadata,"
                " data) VALUES (%s, now(), %s, %s, %s, %s)",
                rows,
            )
        first = count == counts[0]

        assert len(s3_storage.list_checkpoints()) == count
        assert len(pg_storage.list_checkpoints()) == count

        def s3_list(st: S3CheckpointStorage = s3_storage) -> float:
            return timed(st.list_checkpoints, 1)

        def pg_list(st: PostgresCheckpointStorage = pg_storage) -> float:
            return timed(st.list_checkpoints, 1)

        def s3_raw_list(b: str = bucket) -> float:
            return timed(lambda: _raw_s3_listing(client, b), 1)

        cases += [
            Case(f"s3_raw_list_{count}", f"raw LIST + ranged GETs, {count}", s3_raw_list),
            Case(
                f"s3_list_{count}",
                f"S3 list_checkpoints, {count}",
                s3_list,
                f"s3_raw_list_{count}",
            ),
            Case(
                f"pg_list_{count}",
                f"PostgreSQL list_checkpoints, {count}",
                pg_list,
                None if first else f"pg_list_{counts[0]}",
                close=pg_storage.close,
            ),
        ]
    return cases


def _raw_s3_listing(client: Any, bucket: str) -> list[bytes]:
    """The least code listing checkpoints' headers: LIST pages, 16 ranged GETs at once."""
    keys = [
        item["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for item in page.get("Contents", [])
    ]

    def head(key: str) -> bytes:
        answer = client.get_object(Bucket=bucket, Key=key, Range="bytes=0-4095")
        return bytes(answer["Body"].read()).split(b"\n", 1)[0]

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(head, keys))


def remote_suites(quick: bool) -> list[Suite]:
    """The remote suites; servers that cannot start leave a line saying why."""
    try:
        s3 = servers.start_s3()
    except (servers.ServerUnavailable, OSError, ImportError) as exc:
        return [Suite("Remote checkpoints", [], 0, [f"S3: skipped, {exc}"])]
    try:
        pg = servers.start_postgres()
    except (servers.ServerUnavailable, OSError, ImportError) as exc:
        servers.discard(s3)
        return [Suite("Remote checkpoints", [], 0, [f"PostgreSQL: skipped, {exc}"])]
    sizes = {"1 KB": 1024, "1 MB": 1 << 20}
    repeat = 5 if quick else 20
    saves = Suite(
        "Remote checkpoints, one session (S3 on SeaweedFS, PostgreSQL 15, 127.0.0.1)",
        _s3_cases(s3, sizes, repeat) + _pg_cases(pg, sizes, repeat),
        3 if quick else 15,
    )
    counts = [100, 1000] if quick else [1000, 10_000]
    listing = Suite("Remote listing", _listing_cases(s3, pg, counts), 3 if quick else 7)
    last = listing.cases[-1].close

    def stop() -> None:
        if last is not None:
            last()
        servers.discard(s3)
        servers.discard(pg)

    listing.cases[-1].close = stop
    return [saves, listing]
