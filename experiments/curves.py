"""`python -m experiments.curves`: the `air-curves` program (air_jax/cli/curves.py)."""

from air_jax.cli import curves

if __name__ == '__main__':
  curves.run()
