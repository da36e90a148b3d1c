"""``python -m maildrop`` -> ``cli.main()``."""

import sys

from .cli import main

sys.exit(main())
