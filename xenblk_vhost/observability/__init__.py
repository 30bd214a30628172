"""The running service's operator surface: what `xenblk-vhost run` answers beside the backend.

    endpoints.py       what `run` starts beside the service (control socket, metrics), and their options
    control_socket.py  the control socket's server (wire format and client: control_protocol.py)
    snapshot.py        the service's devices and counters as one JSON-able dict (one reader for all)
    metrics.py         run --metrics: Prometheus exposition served from trio
    stats_command.py   `xenblk-vhost stats`: a daemon's snapshot as a table or JSON
"""
