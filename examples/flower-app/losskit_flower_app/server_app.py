"""The ServerApp: losskit's federated strategies (run config: ``algorithm``, ``num-server-rounds``, ...)."""

from losskit.integrations.flower.apps import server_app as app

__all__ = ["app"]
