"""Train a toy model, keep the best states by loss, and look at them with ``statekeep ls``.

Run it with ``python examples/train_toy.py``. In a second or two it

1. fits ``y = w * x + b`` to noisy points by gradient descent (pure Python), saving a
   state after every step with ``metadata={"step": ..., "loss": ...}``;
2. prunes with a retention policy: the best 2 states by loss, plus the newest;
3. resumes from the best state, as a restarted program would;
4. prints ``statekeep ls`` of the states directory (the command a person would run).

Everything happens in a temporary directory (printed; ``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from statekeep import KeepBest, KeepLatest, LatestStatesKeeper, PersistentStateMixin, StateStore

STEPS = 12


class Line(PersistentStateMixin):
    """The model: a slope and an intercept, saved as JSON."""

    def __init__(self) -> None:
        self.w = 0.0
        self.b = 0.0

    def save_state(self, path: Path) -> None:
        path.write_text(json.dumps({"w": self.w, "b": self.b}))

    def load_state(self, path: Path) -> None:
        saved = json.loads(path.read_text())
        self.w, self.b = saved["w"], saved["b"]


def data(n: int = 64) -> list[tuple[float, float]]:
    """Points on y = 3x + 1 with a little noise (the same every run)."""
    rng = random.Random(7)
    points = []
    for _ in range(n):
        x = rng.uniform(-1, 1)
        points.append((x, 3 * x + 1 + rng.gauss(0, 0.1)))
    return points


def loss(model: Line, points: list[tuple[float, float]]) -> float:
    """Mean squared error of the model on the points."""
    return sum((model.w * x + model.b - y) ** 2 for x, y in points) / len(points)


def step(model: Line, points: list[tuple[float, float]], lr: float) -> float:
    """One gradient-descent step on the mean squared error; returns the loss after it."""
    n = len(points)
    errors = [(model.w * x + model.b - y, x) for x, y in points]
    model.w -= lr * 2 * sum(e * x for e, x in errors) / n
    model.b -= lr * 2 * sum(e for e, _ in errors) / n
    return loss(model, points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="statekeep-toy-"))
    states = work / "states"
    print(f"working in {work}")
    try:
        model = Line()
        store = StateStore(states)
        store.register("line", model)
        points = data()
        # Every fourth step takes a far larger learning rate and overshoots: the newest
        # state is not always the best one, which is what the policy below is for.
        for i in range(1, STEPS + 1):
            after = step(model, points, lr=0.2 if i % 4 else 1.9)
            store.state_name_format = f"step-{i:02d}.state"
            store.save_state(metadata={"step": i, "loss": round(after, 6)})

        keeper = LatestStatesKeeper(states, policy=KeepBest("loss", 2) | KeepLatest(1))
        removed = keeper.cleanup()
        print(f"pruned {len(removed)} states; kept the best 2 by loss and the newest")

        kept = store.list_states()
        best = min(kept, key=lambda s: s.metadata["loss"])
        restarted = Line()
        again = StateStore(states)
        again.register("line", restarted)
        again.load_state(best.path)
        print(
            f"resumed from {best.path.name}: w={restarted.w:.3f} b={restarted.b:.3f}"
            f" (loss {best.metadata['loss']})"
        )
        assert len(kept) <= 3, kept
        assert kept[-1].metadata["step"] == STEPS, "the newest state is always kept"

        print(f"\n$ statekeep ls {states}")
        sys.stdout.flush()
        done = subprocess.run([sys.executable, "-m", "statekeep", "ls", str(states)], check=False)
        if done.returncode != 0:
            raise SystemExit(f"statekeep ls exited with {done.returncode}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
