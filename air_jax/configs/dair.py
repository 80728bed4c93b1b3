r"""DAIR (difference AIR): the inference network sees image - canvas so far.

Command:
  python -m experiments.train --config=configs/dair.py --workdir=/tmp/dair
  (installed: air-train --config=dair --workdir=/tmp/dair)

Everything else as default.py. Its interest is generalisation to more
objects than seen in training (evaluate on `test_3`). Expected results and
the command of the shipped pretrained/dair: RESULTS.md.
"""

from air_jax.configs import default


def get_config():
  """DAIR: default AIR with the difference input."""
  config = default.get_config()
  config.model.difference = True
  return config
