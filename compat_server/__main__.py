"""``python -m compat_server`` is the ``sms-compat`` command."""

import sys

from compat_server.cli import main

sys.exit(main())
