"""What a published state looks like on a remote, and reading the remote's states.

Layout under the remote (all keys relative to it)::

    seq/<20-digit n>            one create-only marker per claimed commit sequence
    data/<name>/<token>/<path>  the state's files, uploaded first
    states/<name>               its manifest, uploaded LAST and create-only

``states/<name>`` holds a header line naming the upload's random token, then the
state's manifest exactly as committed locally (sealed by its own CRC-32). A state exists
remotely iff its manifest object does; the token keeps two machines publishing one name
from ever mixing their files: each uploads under its own token and only one manifest
wins. This module is the bottom of the remote-snapshot modules: it knows the layout and
nothing of publishing, restoring, sequences or pruning.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from statekeep import _manifest
from statekeep._manifest import MANIFEST_NAME, Manifest
from statekeep.errors import CorruptStateError
from statekeep.remote._base import Remote, check_key

__all__ = [
    "DATA",
    "MAX_MANIFEST",
    "SEQ",
    "STATES",
    "RemoteState",
    "decode_manifest",
    "encode_manifest",
    "read_remote_states",
    "verify_listing",
]

STATES = "states/"
DATA = "data/"
SEQ = "seq/"
_HEAD = b"statekeep-remote 1 "
MAX_MANIFEST = 64 << 20  # a manifest object larger than this is not read


@dataclass(frozen=True)
class RemoteState:
    """A state published to a remote: its name, upload token and manifest."""

    name: str
    token: str
    manifest: Manifest
    raw: bytes  # the manifest's bytes, as committed locally

    @property
    def sequence(self) -> int:
        return self.manifest.sequence

    def data_prefix(self) -> str:
        return f"{DATA}{self.name}/{self.token}/"


def encode_manifest(token: str, raw: bytes) -> bytes:
    return b"%s%s\n%s" % (_HEAD, token.encode("ascii"), raw)


def decode_manifest(name: str, blob: bytes, where: str) -> RemoteState:
    """Parse a remote manifest object; :class:`CorruptStateError` naming ``where`` if bad."""
    head, sep, raw = blob.partition(b"\n")
    token = head[len(_HEAD) :].decode("ascii", "replace")
    if not sep or not head.startswith(_HEAD) or not token.isalnum():
        raise CorruptStateError(f"remote state {where} is malformed: no statekeep-remote header")
    manifest = _manifest.parse(raw, f"remote state {where}")
    for entry in manifest.entries:
        try:
            check_key(entry.path)
        except ValueError as exc:
            raise CorruptStateError(f"remote state {where} is malformed: {exc}") from None
        if entry.path.split("/", 1)[0] == MANIFEST_NAME:
            raise CorruptStateError(f"remote state {where} is malformed: it lists its manifest")
    return RemoteState(name, token, manifest, raw)


def read_remote_states(
    remote: Remote, cache: dict[str, tuple[datetime, int, RemoteState]] | None = None
) -> tuple[list[RemoteState], list[tuple[str, CorruptStateError]]]:
    """Every state on ``remote`` (by sequence, oldest first) and those whose manifest is bad.

    ``cache`` (name -> (modified, size, state)) saves a GET per manifest already seen.
    """
    good: list[RemoteState] = []
    bad: list[tuple[str, CorruptStateError]] = []
    seen: set[str] = set()
    for obj in remote.list(STATES):
        name = obj.key[len(STATES) :]
        if "/" in name:
            continue  # not written by statekeep
        seen.add(name)
        hit = cache.get(name) if cache is not None else None
        if hit is not None and hit[0] == obj.modified and hit[1] == obj.size:
            good.append(hit[2])
            continue
        try:
            if obj.size > MAX_MANIFEST:
                raise CorruptStateError(
                    f"remote state {remote!r}/{obj.key} is malformed: its manifest is"
                    f" {obj.size} bytes (at most {MAX_MANIFEST})"
                )
            rs = decode_manifest(name, remote.get(obj.key), f"{remote!r}/{obj.key}")
        except FileNotFoundError:
            continue  # pruned while we looked
        except CorruptStateError as exc:
            bad.append((name, exc))
            continue
        if cache is not None:
            cache[name] = (obj.modified, obj.size, rs)
        good.append(rs)
    if cache is not None:
        for name in list(cache):
            if name not in seen:
                del cache[name]
    good.sort(key=lambda s: (s.sequence, s.name))
    return good, bad


def verify_listing(remote: Remote, rs: RemoteState) -> bool:
    """Whether every file of ``rs`` is on the remote with its size (one LIST, no download)."""
    prefix = rs.data_prefix()
    sizes = {o.key[len(prefix) :]: o.size for o in remote.list(prefix)}
    return all(e.is_dir or sizes.get(e.path) == e.size for e in rs.manifest.entries)
