"""``python -m kvtier``: the kvtier command (see :mod:`kvtier.cli`)."""
import sys

from .cli import main

sys.exit(main())
