r"""DAIR (difference AIR): the inference network sees image - canvas so far.

Command:
  python -m experiments.train --config=configs/dair.py --workdir=/tmp/dair
  (installed: air-train --config=dair --workdir=/tmp/dair)

Everything else as default.py, the window scale bound included (the
DAIR shipped before it, trained without the bound, counted fewer images
right on every split: RESULTS.md). Its interest is generalisation to more
objects than seen in training (evaluate on `test_3`). Expected (seed 0,
pretrained/dair, measured on a 2-core CPU): test count accuracy 0.98-0.99
from 6k steps, 0.9851 at 16k, and 0.9551 on 3-digit canvases it never saw
(`test_3`). Command of the shipped pretrained/dair: RESULTS.md.
"""

from air_jax.configs import default


def get_config():
  """DAIR: default AIR with the difference input."""
  config = default.get_config()
  config.model.difference = True
  return config
