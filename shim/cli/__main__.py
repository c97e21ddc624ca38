"""``python -m shim.cli``: the ``coco-shim`` command."""

import sys

from shim.cli.main import main

sys.exit(main())
