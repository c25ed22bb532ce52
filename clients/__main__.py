"""``python -m clients``: the camera client (same as ``ndot-client`` / ``python -m clients.dvs_client``)."""

import sys

from clients.dvs_client import main

sys.exit(main())
