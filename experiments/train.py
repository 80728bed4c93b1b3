"""`python -m experiments.train`: the `air-train` program (air_jax/cli/train.py)."""

from air_jax.cli import train

if __name__ == '__main__':
  train.run()
