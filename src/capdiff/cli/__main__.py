"""`python -m capdiff.cli`: the same as the `capdiff` command."""

import sys

from capdiff.cli import main

sys.exit(main())
