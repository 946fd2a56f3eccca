"""NeAR's networks, one module per network, with parameter names that load the official checkpoints unchanged."""
