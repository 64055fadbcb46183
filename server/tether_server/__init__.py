"""tether server: leases, sagas, owner references and sweeps over one transactional store."""

__version__ = "0.1.0"
