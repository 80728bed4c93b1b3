r"""A tiny AIR for tests and smoke runs: seconds on a CPU.

Command:
  python -m experiments.train --config=configs/test.py --workdir=/tmp/air_test

Uses the `small` multi_mnist build (2,000 training canvases) and small
networks. Expected: it runs; no accuracy is promised.
"""

from air_jax.configs import default


def get_config():
  """Tiny sizes, frequent logging and checkpoints."""
  config = default.get_config()
  config.data.builder_config = 'small'
  config.model.lstm_size = 32
  config.model.z_what_size = 8
  config.model.encoder_hidden_size = 32
  config.model.decoder_hidden_size = 32
  config.model.baseline_lstm_size = 16
  config.model.baseline_hidden_size = 16
  config.batch_size = 8
  config.num_train_steps = 6
  config.steps_per_dispatch = 1
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.eval_batch_size = 50
  config.eval_max_examples = 100
  config.image_every_steps = 6
  config.num_picture_images = 4
  config.checkpoint_every_steps = 3
  return config
