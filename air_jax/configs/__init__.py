"""Shipped configs: `default` (AIR), `dair`, `many` (crowded scenes, the grid
model) and `many_dair` (crowded scenes, DAIR), `test` (tiny).

Each module's `get_config()` returns an `ml_collections.ConfigDict`; the
fields are documented in `default.py`. The binaries take a config file path
or one of these names (`air-train --config=dair`).
"""

import pathlib

NAMES = ('default', 'dair', 'many', 'many_dair', 'test')


def path(name: str) -> str:
  """The file of a shipped config, by name."""
  if name not in NAMES:
    raise ValueError(f'no shipped config {name!r}; one of {NAMES}.')
  return str(pathlib.Path(__file__).with_name(f'{name}.py'))
