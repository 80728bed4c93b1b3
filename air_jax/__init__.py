"""air_jax: Attend, Infer, Repeat in JAX.

Reusable pieces: `spatial_transformer` (image_to_window, window_to_image,
windows_to_canvas), `distributions` (count prior, annealing, KLs), `air`
(InferenceCell, AIR), `objectives` (ELBO terms, REINFORCE surrogate,
baseline loss), `metrics`.
"""

__version__ = '0.1.0'
