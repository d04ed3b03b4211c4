"""`python -m posttrain`: the same command as `posttrain`."""

import sys

from posttrain.cli import main

sys.exit(main())
