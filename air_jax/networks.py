"""Linen building blocks of AIR. They know nothing of configs or training.

Glossary of shapes: B batch, F LSTM width, h, w window rows and columns,
D z_what size.
"""

from collections.abc import Sequence
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from air_jax import distributions

__all__ = [
  'GlimpseDecoder',
  'GlimpseEncoder',
  'LSTM',
  'LSTMState',
  'MLP',
]


class LSTMState(NamedTuple):
  """LSTM memory and output, each [B, F]."""

  c: jax.Array
  h: jax.Array


class MLP(nn.Module):
  """Dense layers with ReLU between them (none after the last).

  Attributes:
    features: output width of each layer.
    last_kernel_init: initialiser of the last layer's kernel.
  """

  features: Sequence[int]
  last_kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i, width in enumerate(self.features):
      last = i == len(self.features) - 1
      init = self.last_kernel_init if last else nn.initializers.lecun_normal()
      x = nn.Dense(width, kernel_init=init, name=f'dense_{i}')(x)
      if not last:
        x = nn.relu(x)
    return x


class LSTM(nn.Module):
  """One LSTM step whose input projection is given precomputed.

  AIR feeds the same image to the LSTM at every step, so its projection
  W_x x + b, the costly part, is computed once outside the recurrence and
  passed in as `input_gates`; this module adds W_h h and the small inputs.

  Attributes:
    features: F, the LSTM width.
  """

  features: int

  @nn.compact
  def __call__(
    self, state: LSTMState, input_gates: jax.Array, inputs: jax.Array
  ) -> LSTMState:
    """One step.

    Args:
      state: previous LSTMState, [B, F] each.
      input_gates: [B, 4F] precomputed projection of the large input
        (bias included).
      inputs: [B, K] small extra inputs (projected here, no bias).

    Returns:
      The new LSTMState.
    """
    gates = (
      input_gates
      + nn.Dense(4 * self.features, use_bias=False, name='inputs')(inputs)
      + nn.Dense(4 * self.features, use_bias=False, name='hidden')(state.h)
    )
    i, f, g, o = jnp.split(gates, 4, axis=-1)
    c = nn.sigmoid(f + 1.0) * state.c + nn.sigmoid(i) * jnp.tanh(g)
    return LSTMState(c=c, h=nn.sigmoid(o) * jnp.tanh(c))


class GlimpseEncoder(nn.Module):
  """Window -> posterior of z_what (loc, softplus scale).

  Attributes:
    hidden_size: width of the hidden layer.
    z_what_size: D.
  """

  hidden_size: int
  z_what_size: int

  @nn.compact
  def __call__(self, windows: jax.Array) -> distributions.NormalParams:
    """[B, h, w] windows -> NormalParams with [B, D] fields."""
    x = windows.reshape(windows.shape[0], -1)
    out = MLP((self.hidden_size, 2 * self.z_what_size))(x)
    loc, scale = jnp.split(out, 2, axis=-1)
    return distributions.NormalParams(loc, nn.softplus(scale) + 1e-4)


class GlimpseDecoder(nn.Module):
  """z_what -> window intensities in (0, 1).

  Attributes:
    hidden_size: width of the hidden layer.
    window_size: (h, w).
    output_bias: added before the sigmoid; negative values start dark so
      early, unused steps do not paint the canvas.
  """

  hidden_size: int
  window_size: tuple[int, int]
  output_bias: float = -2.0

  @nn.compact
  def __call__(self, z_what: jax.Array) -> jax.Array:
    """[..., D] -> [..., h, w]."""
    h, w = self.window_size
    out = MLP((self.hidden_size, h * w))(z_what)
    return nn.sigmoid(out + self.output_bias).reshape(*z_what.shape[:-1], h, w)
