"""One clear error line, before any training starts, for everything a user can get wrong on the command line."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path


class RecipeError(ValueError):
    """A bad argument, file, column or preset; reported as one line by ``run_main``."""


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a ``RecipeError`` prints ``<script>: error: <message>`` and returns 2."""
    try:
        main(argv)
    except RecipeError as error:
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        return 2
    return 0
