"""`python -m txflow` is the `txflow` command."""

import sys

from txflow.cli import main

sys.exit(main())
