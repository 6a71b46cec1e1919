"""Training package: TRL + PEFT trainers that turn data into adapters adapterserve serves.

Entry point: ``python -m training <command>`` (see training/README.md).
"""

import os

# OpenMP worker threads that spin-wait between ops collapse throughput when the CPU is shared
# (measured on the 2-core dev box under load: a tiny-model SFT step 0.5 s -> 0.02 s with PASSIVE).
# Takes effect only when set before torch loads, i.e. for `python -m training ...`.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
