"""`xenblk-vhost run`: the daemon around the service, and what every command shares to start.

    run.py        the run command: start-up checks, the service, the control socket and metrics,
                  signals, reload, systemd notifications, how it ends (exit status)
    preflight.py  what is checked before serving (libblkio properties, /dev/xen, xenstored) and the
                  one-line errors with a hint (StartupError: exit 2)
    systemd.py    sd_notify: READY, RELOADING, STOPPING, STATUS and the watchdog pings
    logs.py       --log-level and --log-json for every command; journald priorities and fields
"""
