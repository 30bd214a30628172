"""xenblk-vhost: a userspace Xen block (blkif) backend on trio and libblkio."""

__version__ = "0.1.0"
