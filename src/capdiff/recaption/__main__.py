"""`python -m capdiff.recaption`: the same as `capdiff recaption`."""

import sys

from capdiff.cli import main

sys.exit(main(["recaption", *sys.argv[1:]]))
