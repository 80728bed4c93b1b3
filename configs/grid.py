"""The shipped `grid` config (air_jax/configs/grid.py, where it is documented)."""

from air_jax.configs.grid import get_config  # noqa: F401
