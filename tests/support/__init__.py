"""Shared helpers for tether's tests: throwaway databases, ports and server processes."""
