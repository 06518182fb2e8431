"""Pure math on tensors, one module per family: every loss takes
``reduction`` (``'none'`` first) and ``sample_weight`` and owns no
parameters.  Everything each family module lists in its ``__all__`` is
re-exported here (``losskit.functional.dpo_loss``,
``losskit.functional.arcface_logits``, ...)."""

from losskit.functional import (adversarial, comp_sum, contrastive, episodes, federated, margins, multi_similarity,
                                mvp, negative_flips, pair, preference, self_training, softmax, sparse)
from losskit.functional.adversarial import *  # noqa: F401,F403
from losskit.functional.comp_sum import *  # noqa: F401,F403
from losskit.functional.contrastive import *  # noqa: F401,F403
from losskit.functional.episodes import *  # noqa: F401,F403
from losskit.functional.federated import *  # noqa: F401,F403
from losskit.functional.margins import *  # noqa: F401,F403
from losskit.functional.multi_similarity import *  # noqa: F401,F403
from losskit.functional.mvp import *  # noqa: F401,F403
from losskit.functional.negative_flips import *  # noqa: F401,F403
from losskit.functional.pair import *  # noqa: F401,F403
from losskit.functional.preference import *  # noqa: F401,F403
from losskit.functional.self_training import *  # noqa: F401,F403
from losskit.functional.softmax import *  # noqa: F401,F403
from losskit.functional.sparse import *  # noqa: F401,F403

__all__ = [*adversarial.__all__, *comp_sum.__all__, *contrastive.__all__, *episodes.__all__, *federated.__all__,
           *margins.__all__, *multi_similarity.__all__, *mvp.__all__, *negative_flips.__all__, *pair.__all__,
           *preference.__all__, *self_training.__all__, *softmax.__all__, *sparse.__all__]
