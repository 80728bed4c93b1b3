"""The shipped `test` config (air_jax/configs/test.py, where it is documented)."""

from air_jax.configs.test import get_config  # noqa: F401
