"""Counting, bound and box-quality metrics. Pure functions of arrays.

Glossary of shapes: B batch, K samples, C count classes (max_steps + 1);
for the detection metrics M images, N predictions per image (max_steps) and
G true objects per image.

Counting and bound metrics are jnp (usable under jit). Detection metrics are
host-side numpy: greedy matching and ranking over a whole evaluation set do
not fit a jitted step. Boxes are (top, left, height, width) in continuous
pixel coordinates, as `spatial_transformer.Box`; stack one with
`np.stack(list(box), axis=-1)`.
"""

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  'AP_IOU_THRESHOLDS',
  'average_precision',
  'box_iou',
  'confusion_matrix',
  'count_accuracy',
  'detection_metrics',
  'iwae_bound',
]

# IoU thresholds of AP@[.5:.95] (COCO): 0.5, 0.55, ..., 0.95.
AP_IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))


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


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Intersection over union of boxes.

  Args:
    a: [..., 4] boxes (top, left, height, width), heights and widths >= 0.
    b: [..., 4] boxes, broadcasting against `a`.

  Returns:
    [...] float64 IoU in [0, 1]; 0 where the union is empty (two zero-size
    boxes).
  """
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  a_top, a_left, a_height, a_width = np.moveaxis(a, -1, 0)
  b_top, b_left, b_height, b_width = np.moveaxis(b, -1, 0)
  overlap_rows = np.minimum(a_top + a_height, b_top + b_height) - np.maximum(
    a_top, b_top
  )
  overlap_cols = np.minimum(a_left + a_width, b_left + b_width) - np.maximum(
    a_left, b_left
  )
  inter = np.maximum(overlap_rows, 0.0) * np.maximum(overlap_cols, 0.0)
  union = a_height * a_width + b_height * b_width - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _detection_arrays(
  pred_boxes, pred_scores, pred_valid, true_boxes, true_valid
) -> tuple[np.ndarray, ...]:
  """The detection arguments as numpy arrays (masks bool), shapes checked."""
  pred_boxes, pred_scores, true_boxes = (
    np.asarray(a, np.float64) for a in (pred_boxes, pred_scores, true_boxes)
  )
  pred_valid, true_valid = (
    np.asarray(a).astype(bool) for a in (pred_valid, true_valid)
  )
  if pred_scores.ndim != 2 or true_valid.ndim != 2:
    raise ValueError(
      f'pred_scores must have shape [M, N] and true_valid [M, G], got '
      f'{pred_scores.shape} and {true_valid.shape}.'
    )
  (m, n), g = pred_scores.shape, true_valid.shape[1]
  expected = {
    'pred_boxes': (pred_boxes.shape, (m, n, 4)),
    'pred_valid': (pred_valid.shape, (m, n)),
    'true_boxes': (true_boxes.shape, (m, g, 4)),
    'true_valid': (true_valid.shape, (m, g)),
  }
  for name, (got, want) in expected.items():
    if got != want:
      raise ValueError(f'{name} must have shape {want}, got {got}.')
  return pred_boxes, pred_scores, pred_valid, true_boxes, true_valid


def _greedy_match(
  pred_boxes: np.ndarray,
  pred_scores: np.ndarray,
  pred_valid: np.ndarray,
  true_boxes: np.ndarray,
  true_valid: np.ndarray,
  iou_threshold: float,
) -> tuple[np.ndarray, np.ndarray]:
  """Greedy per-image matching of predictions to true boxes.

  Args: as `average_precision`.

  Returns:
    (is_tp [M, N] bool, matched_iou [M, N] float64: the IoU of the true
    positives, 0 elsewhere). Invalid predictions are never true positives.
  """
  m, n = pred_scores.shape
  is_tp = np.zeros((m, n), bool)
  matched_iou = np.zeros((m, n))
  if true_valid.shape[1] == 0:
    return is_tp, matched_iou
  # [M, N, G]; -1 marks true boxes that cannot be matched (padding).
  iou = box_iou(pred_boxes[:, :, None, :], true_boxes[:, None, :, :])
  iou = np.where(true_valid[:, None, :], iou, -1.0)
  # Descending confidence within each image, stable (ties: lower index
  # first), invalid predictions last.
  order = np.argsort(
    np.where(pred_valid, -pred_scores, np.inf), axis=1, kind='stable'
  )
  taken = np.zeros(true_valid.shape, bool)  # [M, G]
  images = np.arange(m)
  # Vectorised over images, one rank at a time (N is small).
  for rank in range(n):
    pred = order[:, rank]  # [M]
    candidates = np.where(taken, -1.0, iou[images, pred])  # [M, G]
    best = np.argmax(candidates, axis=1)  # Ties: lowest true index.
    best_iou = candidates[images, best]
    hit = pred_valid[images, pred] & (best_iou >= iou_threshold)
    taken[images[hit], best[hit]] = True
    is_tp[images, pred] = hit
    matched_iou[images, pred] = np.where(hit, best_iou, 0.0)
  return is_tp, matched_iou


def _ranked_average_precision(
  scores: np.ndarray, is_tp: np.ndarray, num_true: int
) -> float:
  """All-point interpolated AP of predictions ranked by score.

  Args:
    scores: [P] confidences of all reported predictions.
    is_tp: [P] bool, whether each is a true positive.
    num_true: number of true objects.

  Returns:
    AP as a float.
  """
  if num_true == 0:
    return 1.0 if scores.size == 0 else 0.0
  if scores.size == 0:
    return 0.0
  order = np.argsort(-scores, kind='stable')
  scores, is_tp = scores[order], is_tp[order]
  true_positives = np.cumsum(is_tp)
  reported = np.arange(1, scores.size + 1)
  # Tied scores form one operating point: keep the last of each group, so the
  # result does not depend on how ties are ordered.
  last = np.append(scores[1:] != scores[:-1], True)
  precision = true_positives[last] / reported[last]
  recall = true_positives[last] / num_true
  # Precision made monotone non-increasing from the right.
  precision = np.maximum.accumulate(precision[::-1])[::-1]
  return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def average_precision(
  pred_boxes: np.ndarray,
  pred_scores: np.ndarray,
  pred_valid: np.ndarray,
  true_boxes: np.ndarray,
  true_valid: np.ndarray,
  iou_threshold: float,
) -> float:
  """Average precision of boxes over a set of images (one object class).

  Within each image, the reported predictions in descending confidence are
  greedily matched to the not yet matched true box of highest IoU; the match
  is a true positive when that IoU >= `iou_threshold` (the true box is then
  taken), otherwise the prediction is a false positive and takes nothing, so
  a duplicate of a matched prediction is a false positive. Then all reported
  predictions of all images are ranked by confidence, precision and recall
  accumulated, and AP is the all-point interpolated area: precision made
  monotone non-increasing from the right, times each step of recall, summed
  (PASCAL VOC 2010+ / COCO without the 101-point recall sampling).

  Conventions:
    * Ties in confidence within an image are matched in index order; ties
      across the ranking are one operating point (precision and recall are
      read only after the whole group), so AP does not depend on their order.
    * Ties in IoU go to the lowest true-box index.
    * Images without true boxes add no true objects; their predictions are
      false positives.
    * With no true boxes at all, AP is 1.0 if nothing is reported and 0.0
      otherwise; with true boxes and nothing reported, AP is 0.0.

  Args:
    pred_boxes: [M, N, 4] predicted boxes (top, left, height, width).
    pred_scores: [M, N] confidences (the z_pres probability in AIR).
    pred_valid: [M, N] bool, the predictions the model reports.
    true_boxes: [M, G, 4] true boxes.
    true_valid: [M, G] bool, which true boxes exist (the rest is padding).
    iou_threshold: minimal IoU of a true positive, in (0, 1].

  Returns:
    AP in [0, 1] as a Python float.

  Raises:
    ValueError: if the shapes do not agree.
  """
  pred_boxes, pred_scores, pred_valid, true_boxes, true_valid = (
    _detection_arrays(
      pred_boxes, pred_scores, pred_valid, true_boxes, true_valid
    )
  )
  is_tp, _ = _greedy_match(
    pred_boxes, pred_scores, pred_valid, true_boxes, true_valid, iou_threshold
  )
  return _ranked_average_precision(
    pred_scores[pred_valid], is_tp[pred_valid], int(true_valid.sum())
  )


def detection_metrics(
  pred_boxes: np.ndarray,
  pred_scores: np.ndarray,
  pred_valid: np.ndarray,
  true_boxes: np.ndarray,
  true_valid: np.ndarray,
  counts_pred: np.ndarray,
  counts_true: np.ndarray,
) -> dict[str, float]:
  """Box quality and count errors of an evaluation set.

  Args:
    pred_boxes: [M, N, 4] predicted boxes (top, left, height, width).
    pred_scores: [M, N] confidences (the z_pres probability in AIR).
    pred_valid: [M, N] bool, the predictions the model reports.
    true_boxes: [M, G, 4] true boxes.
    true_valid: [M, G] bool, which true boxes exist.
    counts_pred: [M] int inferred counts.
    counts_true: [M] int true counts.

  Returns:
    Python floats: 'ap50' (AP at IoU 0.5, see `average_precision`),
    'ap50_95' (mean AP over AP_IOU_THRESHOLDS), 'mean_iou' (mean IoU of the
    true-positive pairs matched at IoU 0.5; 0.0 if there are none, so that it
    stays finite for the metric writers), 'overcount_rate' and
    'undercount_rate' (fractions of images whose inferred count is above /
    below the true count; 0.0 for M = 0).

  Raises:
    ValueError: if the shapes do not agree.
  """
  args = _detection_arrays(
    pred_boxes, pred_scores, pred_valid, true_boxes, true_valid
  )
  counts_pred, counts_true = np.asarray(counts_pred), np.asarray(counts_true)
  if counts_pred.shape != counts_true.shape:
    raise ValueError(
      f'counts_pred and counts_true must have the same shape [M], got '
      f'{counts_pred.shape} and {counts_true.shape}.'
    )
  _, pred_scores, pred_valid, _, true_valid = args
  scores, num_true = pred_scores[pred_valid], int(true_valid.sum())

  def ap(is_tp):
    return _ranked_average_precision(scores, is_tp[pred_valid], num_true)

  is_tp_50, matched_iou_50 = _greedy_match(*args, 0.5)
  ious_50 = matched_iou_50[is_tp_50]
  aps = [ap(_greedy_match(*args, t)[0]) for t in AP_IOU_THRESHOLDS]
  return {
    'ap50': ap(is_tp_50),
    'ap50_95': float(np.mean(aps)),
    'mean_iou': float(ious_50.mean()) if ious_50.size else 0.0,
    'overcount_rate': _rate(counts_pred > counts_true),
    'undercount_rate': _rate(counts_pred < counts_true),
  }


def _rate(events: np.ndarray) -> float:
  return float(events.mean()) if events.size else 0.0
