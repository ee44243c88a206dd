"""`python -m sftlab ...`: the CLI, so that `torchrun --nproc_per_node N -m sftlab train CFG` can start it."""

import sys

from .cli.main import main

sys.exit(main())
