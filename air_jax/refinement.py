"""Posterior modes searched by the model's own objective.

The encoder proposes each object alone, and its posterior modes (z_pres =
q > 0.5, every other latent at its mean) are what it amortises, not the
maximum of the model's objective. The functions here start from those
modes and climb, under the same trained model,

  g(z) = log p(x | z) - sum_n z_n (KL_where_n + KL_what_n - logit p)
         - repulsion

(`objectives.set_objective`): flips of single z_pres (`greedy_z_pres`),
rounds of z_where ascent with every glimpse re-read (`refine_modes`), one
object tried as absent (`drop_objects`) and one window tried as two
(`split_objects`). Nothing is trained. Models whose proposals are
independent given the image (`grid.GridAIR`) use g as it is; a sequential
AIR's or DAIR's steps are taken as a set of proposals (`objects_as_set`),
and `refine` hands them back present first.

Glossary of shapes: B batch, N proposals (steps or cells), C candidates,
K objects tried, D z_what size, h, w window.
"""

import dataclasses
import functools
from typing import NamedTuple
from typing import Protocol

import jax
import jax.numpy as jnp

from air_jax import air
from air_jax import distributions
from air_jax import objectives
from air_jax import spatial_transformer

__all__ = [
  'DROP_GAIN',
  'ObjectsAt',
  'Refinement',
  'Refiner',
  'SPLIT_GAIN',
  'Search',
  'drop_candidates',
  'drop_objects',
  'greedy_z_pres',
  'objects_as_set',
  'refine',
  'refine_modes',
  'split_candidates',
  'split_objects',
]

# How much a split must raise the objective to be taken (nats; chosen on
# training canvases, RESULTS.md): the objective of `pretrained/air` takes
# some wide single digits as two windows by a few nats.
SPLIT_GAIN = 10.0

# How much dropping an object must raise the objective to be taken (nats):
# none, the objective decides (`drop_objects`).
DROP_GAIN = 0.0

# Unit vectors (x, y) along which `split_objects` splits a window.
_SPLIT_DIRECTIONS = (
  (1.0, 0.0),
  (0.0, 1.0),
  (0.5**0.5, 0.5**0.5),
  (0.5**0.5, -(0.5**0.5)),
)


class Refinement(NamedTuple):
  """What to search, for any model: up to `flips` flips of z_pres
  (`greedy_z_pres`; 0: the encoder's modes), then `rounds` rounds of
  z_where ascent and flips (`refine_modes`), then, if `drops` > 0, each of
  the `drops` least probable present objects tried as absent
  (`drop_objects`), then, if `splits` > 0, each of the `splits` largest
  present windows tried as two, taken where that raises the objective by
  more than `split_gain` nats (`split_objects`). Drops and splits refine
  each candidate by `rounds` rounds (they need rounds > 0). Hashable: a
  static argument of jitted functions."""

  flips: int
  rounds: int = 0
  splits: int = 0
  split_gain: float = SPLIT_GAIN
  drops: int = 0

  def report(self) -> dict[str, int | float]:
    """The settings as the fields of an evaluation report
    ('refine_flips', ...)."""
    return {f'refine_{name}': value for name, value in self._asdict().items()}


class Refiner(NamedTuple):
  """A Refinement and the objective it climbs: the model's LossConfig read
  at training step `step` (`configuration.loss_config` of the checkpoint's
  config, and its num_train_steps). A static argument of jitted functions
  (`inference.infer_records`), where `step` must be a Python int; inside
  a jitted function it may be traced (`evaluation.eval_batch`)."""

  refinement: Refinement
  loss_config: objectives.LossConfig
  step: int | jax.Array


class ObjectsAt(Protocol):
  """(z_where [B, N, 3], z_pres [B, N]) -> (q(z_what) [B, N, D], windows
  [B, N, h, w]) of the images being refined (e.g. `grid.GridAIR.objects_at`
  with its params; z_pres matters only to models whose objects depend on
  each other, DAIR: `air.AIR.objects_at`)."""

  def __call__(
    self, z_where: jax.Array, z_pres: jax.Array
  ) -> tuple[distributions.NormalParams, jax.Array]: ...


class Search(NamedTuple):
  """What the searches over z_where need besides the images: the
  objective (`config` read at `step`), the model's re-reading of its
  objects (`objects_at`) and the bounds of z_where's means ([N, 3] lower
  and upper, e.g. `grid.GridAIR.z_where_bounds`), and the search's own
  settings: at most `max_flips` flips in each `greedy_z_pres`, `rounds`
  rounds of ascent, each of `where_steps` Adam steps of size `where_lr`
  (normalised coordinates)."""

  config: objectives.LossConfig
  step: int | jax.Array
  objects_at: ObjectsAt
  bounds: tuple[jax.Array, jax.Array]
  max_flips: int
  rounds: int = 0
  where_steps: int = 10
  where_lr: float = 0.05


def objects_as_set(config: objectives.LossConfig) -> objectives.LossConfig:
  """A sequential AIR's objective as `greedy_z_pres` and `refine_modes` use
  it on its posterior modes: its N steps taken as N proposals, each present
  or not, with the canvas the sum of the present ones.

  The sequential prior gives k present objects (steps 1..k) the probability
  p^k (1 - p) (p^N for k = N) and each object's z_where and z_what the same
  prior whatever its step; the likelihood depends on the set of objects, not
  their order. So any k present proposals, moved to the first k steps
  (`air.present_first`), have the sequential model's objective up to
  log(1 - p) for each absent step after the first (1e-5 nats at the
  default p): the independent per-proposal prior of the grid model's
  estimator 'local'. The estimator only tells `greedy_z_pres` that this
  objective applies; nothing here is trained."""
  return dataclasses.replace(config, estimator='local', baseline='none')


def greedy_z_pres(
  output: air.AIROutput,
  images: jax.Array,
  config: objectives.LossConfig,
  step: jax.Array | int,
  max_flips: int,
) -> air.AIROutput:
  """z_pres moved to a local maximum of the model's own objective, one flip
  at a time (iterated conditional modes), for models whose proposals are
  independent given the image (config.estimator 'local'), or a sequential
  AIR's steps taken as a set of proposals (`objects_as_set`).

  With every other latent as in `output` (its means, for posterior modes),
  z_pres maximises
    g(z) = f(z) + sum_n z_n log(p / (1 - p)),
  f as in `objectives.local_signal` (the likelihood, each present object's
  KL_where and KL_what, the repulsion) and p the z_pres prior at `step`
  (g is `objectives.set_objective`). Each round flips, in every image, the
  one z_pres_n that raises g most, if any does; after `max_flips` rounds,
  or once no flip raises g, z_pres is returned with the canvas redrawn.
  The encoder's q(z_pres) decides each proposal alone; this lets
  proposals explain each other away (two proposals on one digit: the
  second adds little ink and pays its prior, so it is dropped).

  Args:
    output: AIROutput of a model with independent proposals.
    images: [B, H, W].
    config: the objective's settings (prior, likelihood, repulsion).
    step: the training step the schedules are read at.
    max_flips: most rounds (each flips at most one z_pres per image).

  Returns:
    The output with z_pres and canvas replaced (z_pres_prob is still q).
  """
  if config.estimator != 'local':
    raise ValueError(
      'greedy_z_pres needs a model with independent proposals (estimator '
      f"'local'), not {config.estimator!r}; for a sequential AIR's modes "
      'use objects_as_set(config).'
    )
  prior_logit = objectives.z_pres_prior_logit(config, step)

  def flip_best(_, out):
    gain = (
      objectives.local_signal(
        out,
        images,
        config.z_where_prior(),
        config.likelihood,
        config.likelihood_std(step),
        config.repulsion(step),
      )
      + prior_logit
    )
    gain = jnp.where(out.z_pres > 0.5, -gain, gain)  # Of flipping each.
    best = jnp.argmax(gain, axis=1)
    flip = (jnp.max(gain, axis=1) > 0)[:, None] & (
      jnp.arange(gain.shape[1])[None] == best[:, None]
    )
    z_pres = jnp.where(flip, 1.0 - out.z_pres, out.z_pres)
    canvas = spatial_transformer.windows_to_canvas(
      out.windows, out.z_where, z_pres, images.shape[1:]
    )
    return out._replace(z_pres=z_pres, canvas=canvas)

  return jax.lax.fori_loop(0, max_flips, flip_best, output)


def refine_modes(
  output: air.AIROutput, images: jax.Array, search: Search
) -> air.AIROutput:
  """Posterior modes of a model with independent proposals (or a
  sequential model's steps taken as a set, `objects_as_set`) moved up the
  model's own objective: `greedy_z_pres`, then `search.rounds` times (i)
  `search.where_steps` steps of Adam ascent on every proposal's z_where, up
  `objectives.refinement_objective`, each glimpse re-read and redrawn by
  the model at its new z_where and the means kept within `search.bounds`
  (`search.objects_at`, given z_pres: a DAIR re-reads its objects one
  after the other, and its gradient runs through that chain), (ii)
  `greedy_z_pres` again (its flips keep every object's drawing; the next
  round re-reads them).

  The encoder proposes each object alone; the flips of `greedy_z_pres` can
  only choose among its proposals. Moving them lets a window that sits
  between two digits move onto one (the other's proposal then pays for
  itself), and two windows on one digit meet (the repulsion and the prior
  then drop one). z_where's posterior stds and q(z_pres) are kept.

  Args:
    output: AIROutput of the posterior modes (deterministic).
    images: [B, H, W].
    search: the objective, the model's re-reading, the bounds and the
      settings (Normal likelihood for rounds > 0).

  Returns:
    The refined AIROutput (z_pres, z_where, z_what, windows, canvas).
  """
  output = greedy_z_pres(
    output, images, search.config, search.step, search.max_flips
  )
  return _ascent_rounds(output, images, search)


def _redraw(
  output: air.AIROutput, z_where: jax.Array, objects_at: ObjectsAt
) -> air.AIROutput:
  """`output` with its objects re-read and redrawn at z_where [B, N, 3]."""
  what_q, windows = objects_at(z_where, output.z_pres)
  canvas = spatial_transformer.windows_to_canvas(
    windows, z_where, output.z_pres, output.canvas.shape[1:]
  )
  return output._replace(
    z_where=z_where,
    z_where_loc=z_where,
    z_what=what_q.loc,
    z_what_loc=what_q.loc,
    z_what_scale=what_q.scale,
    windows=windows,
    canvas=canvas,
  )


def _ascent_rounds(
  output: air.AIROutput, images: jax.Array, search: Search
) -> air.AIROutput:
  """`search.rounds` rounds of z_where ascent then `greedy_z_pres`
  (`refine_modes` after its first flips)."""
  config, step, objects_at = search.config, search.step, search.objects_at
  lower, upper = search.bounds
  b1, b2, eps = 0.9, 0.999, 1e-8

  def ascend(out):
    grad_fn = jax.grad(
      lambda z: jnp.sum(
        objectives.refinement_objective(
          _redraw(out, z, objects_at), images, config, step
        )
      )
    )

    def adam(t, state):
      z, m, v = state
      grad = grad_fn(z)
      m = b1 * m + (1.0 - b1) * grad
      v = b2 * v + (1.0 - b2) * grad**2
      t = t + 1.0
      update = (m / (1.0 - b1**t)) / (jnp.sqrt(v / (1.0 - b2**t)) + eps)
      return jnp.clip(z + search.where_lr * update, lower, upper), m, v

    zeros = jnp.zeros_like(out.z_where)
    z, _, _ = jax.lax.fori_loop(
      0, search.where_steps, adam, (out.z_where, zeros, zeros)
    )
    return _redraw(out, z, objects_at)

  def one_round(out, _):
    out = greedy_z_pres(ascend(out), images, config, step, search.max_flips)
    return out, None

  output, _ = jax.lax.scan(one_round, output, None, length=search.rounds)
  return output


def split_candidates(
  z_pres: jax.Array,
  z_where: jax.Array,
  num_objects: int,
  shrink: float = 1.5,
  bounds: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Each of the `num_objects` largest present windows of every image split
  in two, along each of four directions (horizontal, vertical, the two
  diagonals): two windows `shrink` times smaller than the one they replace,
  whose centres sit a quarter of its width either side of its centre; the
  second takes an absent proposal: the first one whose `bounds` on the
  centre hold it (or come nearest; without bounds, the first absent one).

  Args:
    z_pres: [B, N] in {0, 1}.
    z_where: [B, N, 3] (s, x, y).
    num_objects: K, how many present windows (the largest first) to split.
    shrink: the new windows' scale over the old one's (> 1: smaller).
    bounds: optional ([N, 3], [N, 3]) bounds of each proposal's z_where
      (a grid model's cells reach only so far).

  Returns:
    (z_pres [B, C, N], z_where [B, C, N, 3], valid [B, C]) of the C = 4K
    candidates, ordered by window then direction; a candidate is invalid
    when its image has fewer than k present windows or no absent proposal.
  """
  n = z_pres.shape[1]
  present = z_pres > 0.5
  largest = jnp.where(present, -jnp.abs(z_where[..., 0]), -jnp.inf)
  _, which = jax.lax.top_k(largest, num_objects)  # [B, K]
  enough = jnp.take_along_axis(present, which, axis=1)  # [B, K]
  directions = jnp.asarray(_SPLIT_DIRECTIONS, z_where.dtype)  # [D, 2]
  old = jnp.take_along_axis(z_where, which[..., None], axis=1)  # [B, K, 3]
  offset = (0.5 / jnp.abs(old[..., :1]))[:, :, None] * directions  # [B,K,D,2]
  new_scale = jnp.broadcast_to(
    old[:, :, None, :1] * shrink, offset.shape[:-1] + (1,)
  )
  centre = old[:, :, None, 1:]
  first = jnp.concatenate([new_scale, centre + offset], -1)  # [B, K, D, 3]
  second = jnp.concatenate([new_scale, centre - offset], -1)
  b, k, d = first.shape[:3]
  # How far each proposal's bounds keep it from the second centre.
  lower, upper = (
    (jnp.full((n, 3), -jnp.inf), jnp.full((n, 3), jnp.inf))
    if bounds is None
    else bounds
  )
  at = second[:, :, :, None, 1:]  # [B, K, D, 1, 2]
  miss = jnp.sum(
    (at - jnp.clip(at, lower[:, 1:], upper[:, 1:])) ** 2, axis=-1
  )  # [B, K, D, N]
  miss = jnp.where(present[:, None, None], jnp.inf, miss)
  free = jnp.argmin(miss, axis=-1)  # [B, K, D]
  slots = jnp.arange(n)
  is_which = (slots == which[:, :, None, None])[..., None]  # [B,K,1,N,1]
  is_free = (slots == free[..., None])[..., None]  # [B,K,D,N,1]
  candidate = jnp.where(
    is_which,
    first[:, :, :, None],
    jnp.where(is_free, second[:, :, :, None], z_where[:, None, None]),
  )  # [B, K, D, N, 3]
  pres = jnp.where(is_free[..., 0], 1.0, z_pres[:, None, None])
  has_free = jnp.any(~present, axis=1)
  valid = jnp.broadcast_to((enough & has_free[:, None])[:, :, None], (b, k, d))
  return (
    pres.reshape(b, k * d, n),
    candidate.reshape(b, k * d, n, 3),
    valid.reshape(b, k * d),
  )


def split_objects(
  output: air.AIROutput,
  images: jax.Array,
  search: Search,
  num_objects: int = 1,
  shrink: float = 1.5,
  min_gain: float = SPLIT_GAIN,
) -> air.AIROutput:
  """Refined modes (`refine_modes`' output) given the chance to read one
  object as two: the `split_candidates` of the present windows, each
  re-read and redrawn by the model and refined by `search.rounds` rounds
  of z_where ascent and flips; per image, the candidate of highest
  `objectives.set_objective` g replaces `output` if it beats it by more
  than `min_gain` nats.

  The ascent moves one window at a time up g; a window that covers two
  close digits sits at a local maximum that the two digits' own windows
  can beat only together (each alone leaves the other's ink to the big
  window). A split proposes the pair, and the model's objective decides.

  Args:
    output: refined posterior modes (`refine_modes`).
    images: [B, H, W].
    search: as for `refine_modes` (rounds >= 1: each candidate's).
    num_objects: how many present windows (the largest first) to split.
    shrink: see `split_candidates`.
    min_gain: how much a split must raise g to be taken (nats).

  Returns:
    AIROutput: per image, `output` or its best split.
  """
  z_pres, z_where, valid = split_candidates(
    output.z_pres, output.z_where, num_objects, shrink, search.bounds
  )
  candidates = (z_pres, jnp.clip(z_where, *search.bounds), valid)
  return _best_candidate(output, images, search, candidates, min_gain)


def drop_candidates(
  z_pres: jax.Array, z_pres_prob: jax.Array, num_objects: int
) -> tuple[jax.Array, jax.Array]:
  """Each of the `num_objects` present objects of every image whose
  q(z_pres) is lowest turned off, one per candidate.

  Args:
    z_pres: [B, N] in {0, 1}.
    z_pres_prob: [B, N] the encoder's q(z_pres).
    num_objects: K, how many present objects (the least probable first).

  Returns:
    (z_pres [B, K, N], valid [B, K]) of the K candidates; a candidate is
    invalid when its image has fewer than k present objects.
  """
  n = z_pres.shape[1]
  present = z_pres > 0.5
  least = jnp.where(present, -z_pres_prob, -jnp.inf)
  _, which = jax.lax.top_k(least, num_objects)  # [B, K]
  valid = jnp.take_along_axis(present, which, axis=1)
  off = jnp.arange(n) == which[..., None]  # [B, K, N]
  return jnp.where(off, 0.0, z_pres[:, None]), valid


def drop_objects(
  output: air.AIROutput,
  images: jax.Array,
  search: Search,
  num_objects: int = 1,
  min_gain: float = DROP_GAIN,
) -> air.AIROutput:
  """Refined modes (`refine_modes`' output) given the chance to read one
  object fewer: each of the `drop_candidates` (one present object turned
  off) re-read and redrawn by the model and its windows moved by
  `search.rounds` rounds of z_where ascent, without flips (a flip could
  turn the dropped object back on: the candidate is the reading with one
  object fewer); per image, the candidate of highest
  `objectives.set_objective` g replaces `output` if it beats it by more
  than `min_gain` nats.

  The mirror of `split_objects`. A flip turns an object off with every
  other window where it is; an object can pay for itself there and not
  once the others have moved (DAIR's pairs read as three, RESULTS.md).
  Dropping it and moving the rest lets the model's objective compare the
  two readings.

  Args:
    output: refined posterior modes (`refine_modes`).
    images: [B, H, W].
    search: as for `refine_modes` (rounds >= 1: each candidate's; its
      max_flips is not used).
    num_objects: how many present objects (the least probable first) to
      try without.
    min_gain: how much a drop must raise g to be taken (nats).

  Returns:
    AIROutput: per image, `output` or its best drop.
  """
  z_pres, valid = drop_candidates(
    output.z_pres, output.z_pres_prob, num_objects
  )
  z_where = jnp.broadcast_to(
    output.z_where[:, None], z_pres.shape + output.z_where.shape[-1:]
  )
  return _best_candidate(
    output,
    images,
    search._replace(max_flips=0),
    (z_pres, z_where, valid),
    min_gain,
  )


def _best_candidate(
  output: air.AIROutput,
  images: jax.Array,
  search: Search,
  candidates: tuple[jax.Array, jax.Array, jax.Array],
  min_gain: float,
) -> air.AIROutput:
  """Per image, `output` or the best of `candidates` (z_pres [B, C, N],
  z_where [B, C, N, 3], valid [B, C]), each redrawn and refined by
  `search.rounds` rounds of ascent and flips, by
  `objectives.set_objective` g: a candidate must beat `output` by more
  than `min_gain` nats (`split_objects`, `drop_objects`)."""
  z_pres, z_where, valid = candidates

  def g(out):
    return objectives.set_objective(out, images, search.config, search.step)

  def refine_one(pres, where):
    out = _redraw(output._replace(z_pres=pres), where, search.objects_at)
    out = _ascent_rounds(out, images, search)
    return out, g(out)

  refined, gains = jax.vmap(refine_one, in_axes=1, out_axes=1)(z_pres, z_where)
  gains = jnp.where(valid, gains, -jnp.inf)  # [B, C]
  gains = jnp.concatenate([g(output)[:, None] + min_gain, gains], axis=1)
  best = jnp.argmax(gains, axis=1)  # [B] 0: `output` kept.

  def pick(keep, other):
    stacked = jnp.concatenate([keep[:, None], other], axis=1)
    index = best.reshape(-1, *([1] * (stacked.ndim - 1)))
    return jnp.take_along_axis(stacked, index, axis=1)[:, 0]

  return jax.tree.map(pick, output, refined)


def refine(
  model, params, images: jax.Array, out: air.AIROutput, refiner: Refiner
) -> air.AIROutput:
  """`out`, the posterior modes of a grid model or of a sequential AIR
  or DAIR on `images`, refined as `refiner` says. A sequential model's
  steps are refined as a set of proposals (`objects_as_set`: AIR and DAIR
  share the generative model, whose objective does not depend on the
  order of the objects) and handed back with the present objects first
  (`air.present_first`). DAIR's objects are re-read in that order, each
  from the image minus the present objects before it
  (`air.AIR.objects_at`). The sequential model must compute every step
  (`skip_finished` off; `inference.modes` sees to it).

  Args:
    model: an `air.AIR` or `grid.GridAIR` module.
    params: its parameters.
    images: [B, H, W].
    out: the model's posterior modes of `images`.
    refiner: the Refinement and the model's objective.

  Returns:
    The refined AIROutput.
  """
  settings = refiner.refinement
  sequential = isinstance(model, air.AIR)
  config = refiner.loss_config
  if sequential:
    config = objects_as_set(config)
  objects_at = functools.partial(
    model.apply, {'params': params}, images, method='objects_at'
  )
  search = Search(
    config,
    refiner.step,
    objects_at,
    model.z_where_bounds(),
    settings.flips,
    settings.rounds,
  )
  refined = refine_modes(out, images, search)
  if settings.drops:
    refined = drop_objects(refined, images, search, settings.drops)
  if settings.splits:
    refined = split_objects(
      refined,
      images,
      search,
      num_objects=settings.splits,
      min_gain=settings.split_gain,
    )
  return air.present_first(refined) if sequential else refined
