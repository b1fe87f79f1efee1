"""``python -m statekeep``: the same as the ``statekeep`` command."""

from __future__ import annotations

import sys

from statekeep._cli import main

if __name__ == "__main__":
    sys.exit(main())
