"""The shipped `many_dair` config (air_jax/configs/many_dair.py, where it is documented)."""

from air_jax.configs.many_dair import get_config  # noqa: F401
