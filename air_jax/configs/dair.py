r"""DAIR (difference AIR): the inference network sees image - canvas so far.

Command:
  python -m experiments.train --config=configs/dair.py --workdir=/tmp/dair
  (installed: air-train --config=dair --workdir=/tmp/dair)

Everything else as default.py, except that the window scale is not
bounded (`model.z_where_scale_range` (), which means none, as None does,
but stays a tuple so that the command line can set a bound, e.g.
`--config.model.z_where_scale_range="(1.8,5.0)"`): the shipped
pretrained/dair was trained without the bound, which the default recipe
gained later. Its
interest is generalisation to more objects than seen in training (evaluate
on `test_3`). Expected results and the command of the shipped
pretrained/dair: RESULTS.md.
"""

from air_jax.configs import default


def get_config():
  """DAIR: default AIR with the difference input."""
  config = default.get_config()
  config.model.difference = True
  config.model.z_where_scale_range = ()  # No bound.
  return config
