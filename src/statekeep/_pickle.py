"""Pickle helpers for components, as pamiq-core offers them: opt-in, never implicit.

statekeep itself never pickles. These exist so that a component ported from
pamiq-core (``from pamiq_core.state_persistence import save_pickle``) keeps working
after the import change. Unpickling runs code chosen by whoever wrote the file: load
only files your own program wrote.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

__all__ = ["load_pickle", "save_pickle"]


def save_pickle(obj: Any, path: str | Path) -> None:
    """Pickle ``obj`` to ``path`` (with the highest protocol).

    Meant for a component's :meth:`~statekeep.PersistentStateMixin.save_state`: the
    store builds the state privately, so the file needs no atomic write of its own.

    Raises:
        pickle.PicklingError: ``obj`` cannot be pickled.
        OSError: ``path`` cannot be written.
    """
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)


def load_pickle(path: str | Path) -> Any:
    """Unpickle the object in ``path``. Only for files your own program wrote.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        pickle.UnpicklingError: the file is not a valid pickle.
    """
    with open(path, "rb") as fh:
        return pickle.load(fh)
