"""`python -m experiments.infer`: the `air-infer` program (air_jax/cli/infer.py)."""

from air_jax.cli import infer

if __name__ == '__main__':
  infer.run()
