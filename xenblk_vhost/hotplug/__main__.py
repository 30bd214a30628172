"""`python -m xenblk_vhost.hotplug add|remove`: what the /etc/xen/scripts shim execs."""

import sys

from .script import main

sys.exit(main())
