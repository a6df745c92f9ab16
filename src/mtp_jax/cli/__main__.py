"""`python -m mtp_jax.cli`: mtp-train, as the launchers in launch/ start it."""

import sys

from mtp_jax.cli.train import main

sys.exit(main())
