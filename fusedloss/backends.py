"""Public view of backend selection: ``available(device)``, ``info()`` and the backend names."""
from fusedloss._backend import BACKENDS, ENV_VAR, available, info, resolve, why_unavailable

__all__ = ["BACKENDS", "ENV_VAR", "available", "info", "resolve", "why_unavailable"]
