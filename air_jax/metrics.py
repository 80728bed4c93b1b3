"""Counting metrics and bound summaries. Pure functions of arrays.

Glossary of shapes: B batch, K samples, C count classes (max_steps + 1).
"""

import jax
import jax.numpy as jnp


def count_accuracy(inferred: jax.Array, true: jax.Array) -> jax.Array:
  """Fraction of images whose inferred count equals the true count.

  Args:
    inferred: [B] int counts.
    true: [B] int counts.

  Returns:
    Scalar float in [0, 1].
  """
  return jnp.mean((inferred == true).astype(jnp.float32))


def confusion_matrix(
  true: jax.Array, inferred: jax.Array, num_classes: int
) -> jax.Array:
  """Counts of (true, inferred) pairs.

  Args:
    true: [B] int in [0, num_classes).
    inferred: [B] int; values >= num_classes are clipped into the last
      column.
    num_classes: C.

  Returns:
    [C, C] int32 matrix, rows true counts, columns inferred counts.
  """
  inferred = jnp.clip(inferred, 0, num_classes - 1)
  true = jnp.clip(true, 0, num_classes - 1)
  flat = true * num_classes + inferred
  counts = jnp.bincount(flat, length=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes).astype(jnp.int32)


def iwae_bound(log_weights: jax.Array) -> jax.Array:
  """Importance-weighted bound log (1/K) sum_k w_k per image.

  Args:
    log_weights: [K, B] log p(x, z_k) - log q(z_k | x).

  Returns:
    [B] bounds (K = 1 gives the ELBO estimate).
  """
  k = log_weights.shape[0]
  return jax.nn.logsumexp(log_weights, axis=0) - jnp.log(float(k))
