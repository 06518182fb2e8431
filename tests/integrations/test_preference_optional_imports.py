"""No discovered module (and not the TRL integration) imports an optional dependency at its top."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")


def run(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=120)


def test_registry_and_integration_import_without_trl_transformers_flwr():
    r = run("""
        import sys
        sys.modules['trl'] = None; sys.modules['transformers'] = None; sys.modules['flwr'] = None
        import losskit
        names = losskit.names(kind=None)
        assert {'dpo', 'ipo', 'madpo', 'beta-dpo', 'glow', 'drift'} <= set(names), names
        import losskit.integrations.trl as t          # the module itself imports without TRL
        assert callable(t.sequence_logps)
        try:
            from losskit.integrations.trl import LosskitDPOTrainer
        except ImportError as e:
            print("IMPORTERROR", e)
        else:
            raise SystemExit("LosskitDPOTrainer imported without TRL")
    """)
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR LosskitDPOTrainer needs TRL (and transformers): pip install 'losskit[trl]'" in r.stdout


def test_loading_the_registry_imports_no_optional_dependency():
    # also where they are installed: discovery and the integration module import none of them
    r = run("""
        import sys
        import losskit
        losskit.names(kind=None)
        import losskit.integrations.trl, losskit.recipes.drift, losskit.weighting.glow
        print(sorted(m for m in ('trl', 'transformers', 'flwr', 'datasets', 'accelerate') if m in sys.modules))
    """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
