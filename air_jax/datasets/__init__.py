"""Datasets. Import `air_jax.datasets.multi_mnist` to register the builder."""
