"""python -m xenblk_vhost.native [--dest DIR] [--force]: build the compiled kernels (see build.py)."""

import sys

from .build import main

sys.exit(main())
