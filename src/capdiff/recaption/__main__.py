"""`python -m capdiff.recaption`: the same as `capdiff recaption`."""

import sys

from capdiff.recaption import main

sys.exit(main())
