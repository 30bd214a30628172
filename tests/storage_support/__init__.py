"""Test helpers for the storage adapter: a real qemu-storage-daemon, loop devices.

Other test modules (the backend's) reuse them:

    from storage_support.qsd import StorageDaemon
    # and the fixtures qsd, vhost_user_disk, loop_backed_file (storage_support.fixtures, a plugin)
"""
