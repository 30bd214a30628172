"""The hotplug script libxl runs for a disk that xenblk-vhost serves.

An xl disk line hands a disk to the daemon through libxl's phy route (all
Xen versions) or tap route (Xen >= 4.19), naming our script and the domain's
YAML file as the target:

    disk = [ 'vdev=xvda, backendtype=phy, script=block-xenblk-vhost, target=/etc/xenblk-vhost/web1.yaml' ]
    disk = [ 'vdev=xvda, backendtype=tap, script=block-xenblk-vhost, target=/etc/xenblk-vhost/web1.yaml' ]

libxl writes the backend dir (params = the target, verbatim for phy,
"aio:<target>" for tap), waits up to 10 s for the daemon to reach InitWait,
then runs `<script> add` with XENBUS_PATH=backend/<vbd|vbd3>/<domid>/<devid>
and waits up to 40 s for it to exit: exit 0 is success; otherwise libxl
logs `hotplug-error` and fails the attach. After detaching (backend Closed)
it runs `<script> remove`, then deletes the dir. Details: script.py.

Modules:
  target   XENBUS_PATH and params -> which device, which YAML file (pure)
  checks   is the daemon serving this device from that file? (pure decisions)
  script   the add/remove actions over xenstore, and the command's main()
  install  `xenblk-vhost install-hotplug`: the shim in /etc/xen/scripts
"""

from .checks import HotplugError
from .script import main

__all__ = ["HotplugError", "main"]
