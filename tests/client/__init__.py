"""Tests of the Python client (``tether_client``) against real servers."""
