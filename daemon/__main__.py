"""`python -m daemon` is the `kioskd` command."""

import sys

from daemon.cli import main

sys.exit(main())
