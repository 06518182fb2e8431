"""The federated recipes and the Flower integration package import without Flower;
looking up a Flower-backed name then names the extra."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_without_flwr():
    code = textwrap.dedent("""
        import sys
        sys.modules['flwr'] = None
        import losskit
        assert {'fedavg', 'fedprox', 'fedld', 'fedlex'} <= set(losskit.names(kind='recipe'))
        import losskit.integrations.flower as fl
        import losskit.integrations.flower.loopback           # runs Flower's programs; imports no flwr
        try:
            fl.FedLDStrategy
        except ImportError as e:
            print("IMPORTERROR", e)
        else:
            raise SystemExit("FedLDStrategy imported without flwr")
        assert not any(m == 'flwr' or m.startswith('flwr.') for m in sys.modules if sys.modules[m] is not None)
    """)
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR losskit.integrations.flower.FedLDStrategy needs Flower: pip install 'losskit[flower]'" in r.stdout
