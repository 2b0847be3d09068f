"""``python -m minirnng`` is the ``minirnng`` command."""

import sys

from .cli import main

sys.exit(main())
