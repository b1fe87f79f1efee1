"""Snapshots on object storage: publish and restore against the least inline boto3 code.

``rsnap_cases(tmp, server, bucket)`` returns two lists of cases (3 x 1 KB, and one
large component); each statekeep case has an inline baseline that moves the same bytes
with plain boto3, files in parallel and large ones through boto3's own multipart
transfer. ``publish_peak_rss(server, bucket, size_mb)`` runs one publish of a large
state in a fresh process and returns its peak memory above the process baseline (KiB).

``python bench/_cases_rsnap.py [SIZE_MB]`` starts a SeaweedFS server (tests/servers.py)
and prints the figures on its own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src"), str(HERE.parent / "tests")]

from _harness import Case, timed  # noqa: E402

from statekeep import _commit, _publish, _remote_states, _restore  # noqa: E402
from statekeep.remote import S3Remote  # noqa: E402

SMALL = [("model", 1024), ("optimizer", 1024), ("buffer", 1024)]


def make_state(root: Path, name: str, files: list[tuple[str, int]]) -> Path:
    """A committed local state holding random files of the given sizes."""
    root.mkdir(parents=True, exist_ok=True)
    with _commit.BuildDir(root, durable=False) as b:
        for fname, size in files:
            with open(b.path / fname, "wb") as f:
                left = size
                while left:
                    chunk = os.urandom(min(left, 8 << 20))
                    f.write(chunk)
                    left -= len(chunk)
        b.commit(root / name)
    return root / name


def _inline_upload(client: Any, bucket: str, prefix: str, state: Path) -> None:
    """The least boto3 code that uploads a state's files in parallel (no manifest logic)."""
    from boto3.s3.transfer import TransferConfig

    files = [p for p in state.rglob("*") if p.is_file()]
    config = TransferConfig(multipart_chunksize=8 << 20, max_concurrency=4)

    def up(p: Path) -> None:
        key = f"{prefix}/{p.relative_to(state)}"
        if p.stat().st_size > 8 << 20:
            client.upload_file(str(p), bucket, key, Config=config)
        else:
            client.put_object(Bucket=bucket, Key=key, Body=p.read_bytes())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(up, files))


def _inline_download(client: Any, bucket: str, prefix: str, target: Path) -> None:
    """The least boto3 code that downloads every object under ``prefix`` in parallel."""
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_chunksize=8 << 20, max_concurrency=4)
    objs = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])

    def down(obj: dict[str, Any]) -> None:
        path = target / obj["Key"][len(prefix) + 1 :]
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, obj["Key"], str(path), Config=config)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(down, objs))


def _pair(
    tmp: Path, server: Any, bucket: str, tag: str, files: list[tuple[str, int]], repeat: int
) -> list[Case]:
    client = server.client(read_timeout=120)
    remote = S3Remote(f"s3://{bucket}/bench-{tag}", client=client)
    state = make_state(tmp / f"rsnap-{tag}", "s.state", files)
    nbytes = sum(size for _, size in files)
    current = [state]
    published: list[_remote_states.RemoteState] = []
    uploads = [0]

    def publish() -> None:
        # A fresh name per call (the state is renamed): the work timed is what
        # save_state() adds with a remote, the files and the manifest.
        fresh = state.parent / f"p{len(published)}.state"
        os.rename(current[0], fresh)
        current[0] = fresh
        published.append(_publish.publish_state(remote, fresh))

    def inline_publish() -> None:
        uploads[0] += 1
        _inline_upload(client, bucket, f"inline-{tag}/{uploads[0]}", current[0])

    def restore() -> None:
        target = tmp / f"restore-{tag}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        _restore.restore_state(remote, published[-1], target, durable=False)

    def inline_restore() -> None:
        target = tmp / f"inline-restore-{tag}"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir()
        _inline_download(client, bucket, f"inline-{tag}/1", target)

    publish()  # one of each first, so restores have something to fetch
    inline_publish()
    return [
        Case(
            f"rsnap-{tag}-publish",
            f"publish ({tag})",
            lambda: timed(publish, repeat),
            f"rsnap-{tag}-inline-publish",
            nbytes,
        ),
        Case(
            f"rsnap-{tag}-inline-publish",
            f"inline boto3 upload ({tag})",
            lambda: timed(inline_publish, repeat),
            None,
            nbytes,
        ),
        Case(
            f"rsnap-{tag}-restore",
            f"restore ({tag})",
            lambda: timed(restore, repeat),
            f"rsnap-{tag}-inline-restore",
            nbytes,
        ),
        Case(
            f"rsnap-{tag}-inline-restore",
            f"inline boto3 download ({tag})",
            lambda: timed(inline_restore, repeat),
            None,
            nbytes,
        ),
    ]


def rsnap_cases(
    tmp: Path, server: Any, bucket: str, *, big_mb: int = 256, repeat: int = 5
) -> tuple[list[Case], list[Case]]:
    """(cases for 3 x 1 KB, cases for one ``big_mb`` MB component)."""
    small = _pair(tmp, server, bucket, "3x1KB", SMALL, repeat)
    big = _pair(tmp, server, bucket, f"{big_mb}MB", [("weights", big_mb << 20)], 1)
    return small, big


def publish_peak_rss(tmp: Path, server: Any, bucket: str, size_mb: int) -> dict[str, int]:
    """Peak RSS (KiB) of one publish of a ``size_mb`` MB state, in a fresh process."""
    env = {**os.environ, **server.env()}
    proc = subprocess.run(
        [sys.executable, __file__, "rss-child", str(tmp / "rss"), bucket, str(size_mb)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the publish child failed: {proc.stderr[-2000:]}")
    out = proc.stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def _rss_child(root: str, bucket: str, size_mb: int) -> None:
    from _rss_child import peak_kib

    state = make_state(Path(root), "big.state", [("weights", size_mb << 20)])
    remote = S3Remote(f"s3://{bucket}/rss-{os.getpid()}")
    remote.list("")  # the client and its connections exist before the baseline
    baseline = peak_kib()
    _publish.publish_state(remote, state)
    print(
        json.dumps(
            {"baseline_kib": baseline, "peak_kib": peak_kib(), "above_kib": peak_kib() - baseline}
        )
    )


def main() -> None:
    import random
    import tempfile

    from _harness import Suite, run_suite, suite_table

    import servers

    if sys.argv[1:2] == ["rss-child"]:
        _rss_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    size_mb = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    server = servers.start_s3()
    tmp = Path(tempfile.mkdtemp(prefix="rsnap-bench-"))
    try:
        bucket = server.new_bucket()
        small, big = rsnap_cases(tmp, server, bucket, big_mb=size_mb)
        rng = random.Random(1)
        for title, cases, rounds in (("3 x 1 KB", small, 15), (f"{size_mb} MB", big, 3)):
            suite = Suite(f"Snapshots on S3 (SeaweedFS), {title}", cases, rounds)
            print(suite_table(suite, run_suite(suite, rng)))
        print("publish peak RSS:", publish_peak_rss(tmp, server, bucket, size_mb))
    finally:
        servers.discard(server)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
