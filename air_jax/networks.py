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
  'PatchConv',
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


def _patches(x: jax.Array, size: tuple[int, int], stride: int) -> jax.Array:
  """[B, H, W, C] -> [B, H', W', kh * kw * C] patches of a 'SAME' convolution
  (H' = ceil(H / stride)), ordered as a [kh, kw, C] kernel flattens."""
  (kh, kw), (_, height, width, _) = size, x.shape
  out_h, out_w = -(-height // stride), -(-width // stride)
  pad_h = max((out_h - 1) * stride + kh - height, 0)
  pad_w = max((out_w - 1) * stride + kw - width, 0)
  x = jnp.pad(
    x,
    (
      (0, 0),
      (pad_h // 2, pad_h - pad_h // 2),
      (pad_w // 2, pad_w - pad_w // 2),
      (0, 0),
    ),
  )
  rows, cols = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
  return jnp.concatenate(
    [
      x[:, i : i + rows : stride, j : j + cols : stride, :]
      for i in range(kh)
      for j in range(kw)
    ],
    axis=-1,
  )


class PatchConv(nn.Module):
  """A 2-D convolution with 'SAME' padding, as `nn.Conv`, written as patch
  extraction and one matmul.

  XLA on CPU runs convolutions inside a `lax.scan` (the training loop runs
  several steps per dispatch in one) far slower than outside it: the grid
  encoder's gradient at batch 64 took 1.3 s per step in a scan against
  42 ms alone; as patches and a matmul, 33 ms in the scan.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: the same stride along both axes.
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] -> [B, ceil(H / strides), ceil(W / strides), features]."""
    return nn.Dense(self.features, name='dense')(
      _patches(x, self.kernel_size, self.strides)
    )
