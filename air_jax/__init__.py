"""air_jax: Attend, Infer, Repeat (Eslami et al., 2016) in JAX/Flax.

Reusable pieces (pure functions and Linen modules):
  spatial_transformer  image_to_window, window_to_image, windows_to_canvas,
                       object_boxes, z_where_to_box
  distributions        Schedule, count prior, Bernoulli/Normal KLs, samplers
  networks, air        LSTM and glimpse networks; InferenceCell, AIR / DAIR
  objectives           ELBO terms, REINFORCE surrogate, baseline loss,
                       LossConfig, air_loss
  metrics              count accuracy, confusion, IWAE, box AP and IoU
Running it: configuration, checkpointing, evaluation, inference, train
(the `[train]` extra), and the `air-*` programs.

Submodules are imported on first use (`air_jax.objectives` works after
`import air_jax`), so importing the package loads nothing heavy.
"""

import importlib

__version__ = '0.2.0'
__all__ = [
  'air',
  'checkpointing',
  'configuration',
  'distributions',
  'evaluation',
  'files',
  'inference',
  'input_pipeline',
  'metrics',
  'networks',
  'objectives',
  'spatial_transformer',
  'train',
  'visualization',
  'writers',
]


def __getattr__(name: str):
  if name in __all__:
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + __all__)
