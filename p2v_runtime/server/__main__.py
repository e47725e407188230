"""``python -m p2v_runtime.server``: the same as ``p2v serve``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
