"""The process exit statuses of every xenblk-vhost command (run, check, stats, demo, hotplug, the device model).

    EXIT_OK           success
    EXIT_FAILURE      the command ran and failed (storage or xenstore gone, a check refused, data mismatch)
    EXIT_USAGE        bad arguments, or a configuration that does not validate (argparse's own status)
    EXIT_INTERRUPTED  stopped by Ctrl-C (128 + SIGINT, as a shell reports it)
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
