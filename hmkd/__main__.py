"""``python -m hmkd`` (and ``torchrun -m hmkd``) runs the command line."""

import sys

from hmkd.cli import main

sys.exit(main())
