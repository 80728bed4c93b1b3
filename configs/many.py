"""The shipped `many` config (air_jax/configs/many.py, where it is documented)."""

from air_jax.configs.many import get_config  # noqa: F401
