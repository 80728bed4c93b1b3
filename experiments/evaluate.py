"""`python -m experiments.evaluate`: the `air-evaluate` program (air_jax/cli/evaluate.py)."""

from air_jax.cli import evaluate

if __name__ == '__main__':
  evaluate.run()
