"""``python -m lsmlflow``: the same as ``ls-mlflow``."""

import sys

from .cli import main

sys.exit(main())
