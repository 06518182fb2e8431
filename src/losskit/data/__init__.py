"""losskit.data: open-set data sets (test classes disjoint from training classes).

Every loader returns an :class:`OpenSetSplit`; see docs/data.md for each split rule.
Batch samplers: :class:`PKSampler` (class-balanced P x K) in ``losskit.data.samplers``,
:class:`~losskit.data.episodes.EpisodeSampler` (N-way K-shot) in ``losskit.data.episodes``.
Streams for online continual learning: :func:`~losskit.data.streams.si_blurry_stream` (Si-Blurry).
"""

from __future__ import annotations

import difflib
import inspect

from losskit.data.digits import load_digits
from losskit.data.folder import load_image_folder
from losskit.data.omniglot import load_omniglot
from losskit.data.samplers import PKSampler, pk_batch_shape
from losskit.data.split import OpenSetSplit
from losskit.data.streams import SiBlurryStream, si_blurry_stream

DATASETS = {"digits": load_digits, "folder": load_image_folder, "omniglot": load_omniglot}


def load_dataset(name: str, data_dir: str | None = None, **kw) -> OpenSetSplit:
    """Load ``"digits"`` (bundled; takes no ``data_dir``), ``"folder"`` or ``"omniglot"``
    (both need ``data_dir``).  Extra keywords go to the loader."""
    if name not in DATASETS:
        close = difflib.get_close_matches(str(name), DATASETS, n=2, cutoff=0.3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"dataset: expected one of {sorted(DATASETS)}, got {name!r}{hint}")
    fn = DATASETS[name]
    params = inspect.signature(fn).parameters
    accepted = [p for p in params if p != "path"]
    bad = [k for k in kw if k not in accepted]
    if bad:
        raise TypeError(f"load_dataset({name!r}): unexpected keyword(s) {bad}; accepted: {accepted}")
    if name == "digits":
        if data_dir is not None:
            raise ValueError(f"data_dir: the 'digits' data set is bundled with scikit-learn and takes no "
                             f"data_dir, got {data_dir!r}")
        return fn(**kw)
    if data_dir is None:
        what = ("a folder with one subfolder per class containing images" if name == "folder"
                else "a folder holding images_background_small1.zip / images_background_small2.zip "
                     "or their extracted folders")
        raise ValueError(f"data_dir: dataset {name!r} needs data_dir, {what}; got None")
    return fn(data_dir, **kw)


__all__ = ["OpenSetSplit", "load_digits", "load_image_folder", "load_omniglot", "load_dataset", "DATASETS", "PKSampler",
           "pk_batch_shape", "SiBlurryStream", "si_blurry_stream"]
