"""``python -m aiodcp``: the command line (see ``aiodcp --help``)."""

import sys

from ._tools._cli import main

sys.exit(main())
