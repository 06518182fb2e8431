"""The ClientApp: local training on this SuperNode's partition (``--node-config "partition-id=i num-partitions=n"``)."""

from losskit.integrations.flower.apps import client_app as app

__all__ = ["app"]
