"""``python -m flashtree.bench``: see ``flashtree.bench.cli``."""
import sys

from .cli import main

sys.exit(main())
