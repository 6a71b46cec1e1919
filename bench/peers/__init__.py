"""Peer servers a user would otherwise pick, measured against adapterserve in the same run."""
