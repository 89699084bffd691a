"""``python -m chatserver.client``: the same program as ``chatserver-client``."""

import sys

from chatserver.client import main

sys.exit(main())
