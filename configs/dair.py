"""The shipped `dair` config (air_jax/configs/dair.py, where it is documented)."""

from air_jax.configs.dair import get_config  # noqa: F401
