"""``python -m hooks check ...``; see hooks/check.py."""

import sys

from .check import main

sys.exit(main())
