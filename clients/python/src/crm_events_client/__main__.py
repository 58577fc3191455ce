"""``python -m crm_events_client``: see ``cli.py``."""

import sys

from .cli import main

sys.exit(main())
