"""``python -m napari_uga.cli``."""

import sys

from . import main

sys.exit(main())
