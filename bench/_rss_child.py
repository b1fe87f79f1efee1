"""Peak memory of one large save, measured in a fresh process.

Usage: python _rss_child.py DIR SIZE_MB {statekeep|raw}. Prints JSON with the peak
resident set size (ru_maxrss, KiB) before the state existed and after the save. The
component writes from a buffer it already holds, as a model's weights would be.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path


def peak_kib() -> int:
    """This process's peak RSS in KiB.

    ``ru_maxrss`` survives ``exec``: a child of a big parent starts with the parent's
    peak. The kernel's ``VmHWM`` (Linux) belongs to this process image alone, so it is
    preferred where it exists.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    root, size, mode = Path(sys.argv[1]), int(sys.argv[2]) << 20, sys.argv[3]
    import statekeep  # imported before the baseline, like any program that saves

    class Weights(statekeep.PersistentStateMixin):
        def __init__(self, data: bytes) -> None:
            self.data = data

        def save_state(self, path: Path) -> None:
            with open(path, "wb", buffering=0) as f:
                f.write(self.data)

    store = statekeep.StateStore(root, durable=True)
    baseline = peak_kib()
    data = os.urandom(size)
    holding = peak_kib()
    if mode == "statekeep":
        store.register("weights", Weights(data))
        store.save_state()
    else:
        fd = os.open(root / "raw.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
    print(json.dumps({"baseline": baseline, "holding": holding, "peak": peak_kib(), "size": size}))


if __name__ == "__main__":
    main()
