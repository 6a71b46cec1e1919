"""Benchmarks. The OpenMP wait policy matches the server's (server/__main__.py) so baselines run alike."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
