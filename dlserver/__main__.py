"""`python -m dlserver ...`: run the frame server (see dlserver.server)."""

import sys

from .server import main

sys.exit(main())
