"""The ``reweighted`` objective: a logits objective times a weighter's weights."""

import io

import pytest
import torch

import losskit
from losskit.weighting import LinUpper


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randint(0, 4, (10,), generator=g)


def test_weights_after_burn_in_and_state():
    z, y = _data()
    obj = losskit.get("reweighted", objective="gce", weighter="linupper", burn_in=1)
    per = losskit.get("gce", reduction="none")(z, y)
    torch.testing.assert_close(obj(z, y), per.mean())          # burn-in: uniform
    obj.step()
    want = (LinUpper(burn_in=0)(per) * per).mean()
    torch.testing.assert_close(obj(z, y), want)
    sw = torch.rand(10, dtype=torch.float64)
    torch.testing.assert_close(obj(z, y, sample_weight=sw), (LinUpper(burn_in=0)(per) * per * sw).mean())
    buf = io.BytesIO()
    torch.save(obj.state_dict(), buf)
    buf.seek(0)
    fresh = losskit.get("reweighted", objective="gce", weighter="linupper", burn_in=1)
    fresh.load_state_dict(torch.load(buf, weights_only=False))
    torch.testing.assert_close(fresh(z, y), want)


def test_glow_needs_ids_and_bad_options():
    z, y = _data()
    obj = losskit.get("reweighted", weighter="glow")
    with pytest.raises(ValueError, match="sample_ids"):
        obj(z, y)
    assert torch.isfinite(obj(z, y, sample_ids=torch.arange(10)))
    obj.end_epoch()
    with pytest.raises(ValueError, match="burn_in"):
        losskit.get("reweighted", weighter="glow", burn_in=3)
    with pytest.raises(ValueError, match="objective"):
        losskit.get("reweighted", objective="arcface")
    with pytest.raises(KeyError, match="weighter"):
        losskit.get("reweighted", weighter="nope")
