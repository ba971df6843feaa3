"""``python -m erasure_core``: see ``erasure_core.cli``."""

from .cli import main

raise SystemExit(main())
