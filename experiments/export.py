"""`python -m experiments.export`: the `air-export` program (air_jax/cli/export.py)."""

from air_jax.cli import export

if __name__ == '__main__':
  export.run()
