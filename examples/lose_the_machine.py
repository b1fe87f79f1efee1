"""Save to a remote, lose the machine, come back from the remote.

Run it with a directory standing in for the bucket (the default), or against S3:

    python examples/lose_the_machine.py
    AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \\
        python examples/lose_the_machine.py s3://my-bucket/run-42
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from statekeep import PersistentStateMixin, StateStore


class Trainer(PersistentStateMixin):
    """A stand-in for a training loop: a step counter and some weights."""

    def __init__(self) -> None:
        self.step = 0
        self.weights = [0.0] * 4

    def train_one_step(self) -> None:
        self.step += 1
        self.weights = [w + 0.5 for w in self.weights]

    def save_state(self, path: Path) -> None:
        path.write_text(json.dumps({"step": self.step, "weights": self.weights}))

    def load_state(self, path: Path) -> None:
        saved = json.loads(path.read_text())
        self.step, self.weights = saved["step"], saved["weights"]


def main(remote: str | None = None) -> int:
    """Save three times, delete the local states, restore; return the restored step."""
    work = Path(tempfile.mkdtemp(prefix="lose-the-machine-"))
    try:
        remote = remote or str(work / "bucket")  # a shared disk stands in for the bucket
        states = work / "states"

        # Machine 1: train and save after every step; each save is published.
        trainer = Trainer()
        store = StateStore(states, remote=remote)
        store.register("trainer", trainer)
        for _ in range(3):
            trainer.train_one_step()
            store.save_state(metadata={"step": trainer.step})

        # The machine is gone, and its disk with it.
        shutil.rmtree(states)

        # Machine 2: an empty states directory; the newest state comes from the remote.
        fresh = Trainer()
        store2 = StateStore(states, remote=remote)
        store2.register("trainer", fresh)
        restored = store2.load_latest_state()
        print(f"restored {restored.name if restored else None} at step {fresh.step}")
        assert fresh.step == 3
        assert fresh.weights == trainer.weights
        assert [s.location for s in store2.list_states()][-1] == "both"
        return fresh.step
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
