"""Registered ``nn.Module`` objectives over ``losskit.functional``, one
module per family; each module registers its classes, and everything each
lists in its ``__all__`` is re-exported here (``losskit.losses.ArcFaceLoss``,
...).  A new family file must be added to the imports below (a test checks
that every submodule is re-exported)."""

from losskit.losses import (baseline, comp_sum, contrastive, episodes, margin, negative_flips, pair, preference,
                            reweighted, xbm)
from losskit.losses.baseline import *  # noqa: F401,F403
from losskit.losses.comp_sum import *  # noqa: F401,F403
from losskit.losses.contrastive import *  # noqa: F401,F403
from losskit.losses.episodes import *  # noqa: F401,F403
from losskit.losses.margin import *  # noqa: F401,F403
from losskit.losses.negative_flips import *  # noqa: F401,F403
from losskit.losses.pair import *  # noqa: F401,F403
from losskit.losses.preference import *  # noqa: F401,F403
from losskit.losses.reweighted import *  # noqa: F401,F403
from losskit.losses.xbm import *  # noqa: F401,F403

__all__ = [*baseline.__all__, *comp_sum.__all__, *contrastive.__all__, *episodes.__all__, *margin.__all__,
           *pair.__all__, *preference.__all__, *reweighted.__all__, *xbm.__all__, *negative_flips.__all__]
