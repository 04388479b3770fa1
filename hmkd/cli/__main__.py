"""``python -m hmkd.cli`` runs the command line, as ``python -m hmkd`` does."""

import sys

from hmkd.cli import main

sys.exit(main())
