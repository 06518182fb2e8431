"""losskit on Flower (optional extra ``flower``: ``pip install 'losskit[flower]'``, Flower 1.42).

* :mod:`~losskit.integrations.flower.strategies`: FedAvg / FedProx / FedLD /
  FedLEx written against Flower's message API (``flwr.serverapp.strategy``);
  they use the aggregation rules and update checks of
  :mod:`losskit.recipes.federated`, record every failed, timed-out and
  rejected client per round, and keep a ``state_dict`` for resume.
* :mod:`~losskit.integrations.flower.apps`: a ``ServerApp`` (``server_app``)
  and a ``ClientApp`` (``client_app``) training a small MLP on scikit-learn's
  bundled digits, partitioned per SuperNode by ``--node-config
  "partition-id=i num-partitions=n"``; the app folder ``examples/flower-app``
  runs them with ``flwr run``.
* :mod:`~losskit.integrations.flower.loopback`: starts one SuperLink and N
  SuperNodes on 127.0.0.1 (insecure or TLS with self-signed certificates),
  runs the app through them with ``flwr run`` and stops every process.

Flower is imported when a name below is first looked up (the launcher needs
only Flower's command-line programs), never at import time of this package.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["FedAvgStrategy", "FedLDStrategy", "FedLExStrategy", "LosskitStrategy", "make_strategy",
           "server_app", "client_app", "run_rounds"]

_WHERE = {"FedAvgStrategy": "strategies", "FedLDStrategy": "strategies", "FedLExStrategy": "strategies",
          "LosskitStrategy": "strategies", "make_strategy": "strategies", "run_rounds": "apps",
          "server_app": "apps", "client_app": "apps"}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        mod = importlib.import_module(f"{__name__}.{_WHERE[name]}")
    except ImportError as e:
        if getattr(e, "name", "") and str(e.name).split(".")[0] == "flwr":
            raise ImportError(f"losskit.integrations.flower.{name} needs Flower: pip install 'losskit[flower]' "
                              f"({e})", name="flwr") from e
        raise
    return getattr(mod, name)
