"""Test helpers for the storage adapter: a real qemu-storage-daemon, loop devices.

Other test modules (the backend's) reuse them:

    from storage_support.qsd import StorageDaemon
    from storage_support.fixtures import qsd, vhost_user_disk  # pytest fixtures
"""
