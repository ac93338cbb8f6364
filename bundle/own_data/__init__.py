"""A user's own blurred stacks, with nothing else: checked, split into training and held-out stacks.

The own-data workflow (``configs/own_data.json``) starts from a folder of raw widefield stacks and
the objective's data sheet. :class:`OwnStacks` reads every stack once, settles the voxel size (the
files' metadata wins over the configured one, with a warning), runs the checks a user needs before
trusting a result (:func:`check_stacks`), and splits the stacks into a training part and a held-out
part that validation scores without ground truth. A single stack is split into two sub-volumes along
its longer lateral axis. Everything it decides is written to ``<work_dir>/own_data.json``.

Written here because no library splits microscopy stacks for unpaired training or checks optics
keys against the data.

Modules: :mod:`~bundle.own_data.checks` (sampling, sizes, spots against the optics),
:mod:`~bundle.own_data.stacks` (:class:`OwnStacks`: voxel size, split, record) and
:mod:`~bundle.own_data.report` (:class:`HeldOutReport`). Everything public is importable from
``bundle.own_data``.
"""

from bundle.own_data.checks import check_stacks, nyquist_voxel_size, spot_fwhm
from bundle.own_data.report import HeldOutReport
from bundle.own_data.stacks import OwnStacks

__all__ = ["OwnStacks", "HeldOutReport", "check_stacks", "nyquist_voxel_size", "spot_fwhm"]
