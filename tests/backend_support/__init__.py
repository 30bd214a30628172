"""Test helpers for the backend datapath: a guest-side frontend on the simulated hypervisor and a Vbd harness."""
