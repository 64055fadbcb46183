"""tether client: generated gRPC stubs and message types for the tether control plane."""

__version__ = "0.1.0"
