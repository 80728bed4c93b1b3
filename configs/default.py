"""The shipped `default` config (air_jax/configs/default.py, where it is documented)."""

from air_jax.configs.default import get_config  # noqa: F401
