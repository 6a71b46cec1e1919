"""adapterserve's own CPU kernels (a torch C++ extension compiled on first use): see loader.py."""

from server.kernels.cpu.loader import load_decode_kernels

__all__ = ["load_decode_kernels"]
