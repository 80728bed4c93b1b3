"""Metrics against hand-computed values."""

import numpy as np
import pytest

from air_jax import metrics

# Building blocks: 10 x 10 boxes (top, left, height, width).
A = [0.0, 0.0, 10.0, 10.0]
B = [0.0, 20.0, 10.0, 10.0]  # Disjoint from A.
C = [30.0, 30.0, 10.0, 10.0]  # Disjoint from A and B.


def _single_image(pred_boxes, pred_scores, true_boxes):
  """One image, every prediction reported, every true box real."""
  pred_boxes = np.asarray(pred_boxes, np.float64).reshape(1, -1, 4)
  true_boxes = np.asarray(true_boxes, np.float64).reshape(1, -1, 4)
  return (
    pred_boxes,
    np.asarray(pred_scores, np.float64).reshape(1, -1),
    np.ones(pred_boxes.shape[:2], bool),
    true_boxes,
    np.ones(true_boxes.shape[:2], bool),
  )


@pytest.mark.parametrize(
  'a, b, expected',
  [
    (A, B, 0.0),  # Disjoint.
    (A, [0.0, 10.0, 10.0, 10.0], 0.0),  # Sharing an edge only.
    ([0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 2.0, 2.0], 4.0 / 16.0),  # Nested.
    ([0.0, 0.0, 2.0, 2.0], [0.0, 1.0, 2.0, 2.0], 2.0 / 6.0),  # Half overlap.
    ([1.5, 2.5, 3.0, 4.0], [1.5, 2.5, 3.0, 4.0], 1.0),  # Identical.
    ([0.0, 0.0, 4.0, 4.0], [2.0, 2.0, 4.0, 4.0], 4.0 / 28.0),  # Corners.
    ([3.0, 3.0, 0.0, 0.0], [3.0, 3.0, 0.0, 0.0], 0.0),  # Empty union.
  ],
)
def test_box_iou_of_simple_boxes(a, b, expected):
  assert metrics.box_iou(np.asarray(a), np.asarray(b)) == pytest.approx(
    expected, abs=1e-12
  )
  # Symmetric.
  assert metrics.box_iou(np.asarray(b), np.asarray(a)) == pytest.approx(
    expected, abs=1e-12
  )


def test_box_iou_broadcasts():
  a = np.asarray([A, B, C])[:, None, :]  # [3, 1, 4]
  # Columns 5..25 overlap A (0..10) and B (20..30) by 5 columns each:
  # IoU 50 / (100 + 200 - 50) = 0.2.
  b = np.asarray([A, [0.0, 5.0, 10.0, 20.0]])[None, :, :]  # [1, 2, 4]
  np.testing.assert_allclose(
    metrics.box_iou(a, b), [[1.0, 0.2], [0.0, 0.2], [0.0, 0.0]], atol=1e-12
  )


def test_perfect_predictions_have_ap_one():
  pred_boxes = np.asarray([[A, B], [C, A]])
  true_boxes = np.asarray([[B, A], [C, C]])
  ap = metrics.average_precision(
    pred_boxes,
    np.asarray([[0.9, 0.3], [0.6, 0.1]]),
    np.asarray([[True, True], [True, False]]),  # The 2nd A is not reported.
    true_boxes,
    np.asarray([[True, True], [True, False]]),  # The 2nd C is padding.
    0.5,
  )
  assert ap == pytest.approx(1.0)


def test_false_positive_ranked_above_a_true_positive():
  # Ranking: FP (p = 0, r = 0), TP (p = 1/2, r = 1). AP = 1 * 1/2.
  ap = metrics.average_precision(*_single_image([C, A], [0.9, 0.8], [A]), 0.5)
  assert ap == pytest.approx(0.5)


def test_ap_of_a_mixed_ranking_with_a_missed_object():
  # Image 0 holds A and B, image 1 holds C, which nobody finds.
  # Ranking: TP(A) .9, FP .8, TP(B) .7, FP .6 over 3 true objects:
  # (r, p) = (1/3, 1), (1/3, 1/2), (2/3, 2/3), (2/3, 1/2).
  # Interpolated precision: 1 on (0, 1/3], 2/3 on (1/3, 2/3], so
  # AP = 1/3 * 1 + 1/3 * 2/3 = 5/9.
  far = [50.0, 50.0, 5.0, 5.0]
  pred_boxes = np.asarray([[A, B], [far, far]])
  pred_scores = np.asarray([[0.9, 0.7], [0.8, 0.6]])
  true_boxes = np.asarray([[A, B], [C, C]])
  true_valid = np.asarray([[True, True], [True, False]])
  ap = metrics.average_precision(
    pred_boxes,
    pred_scores,
    np.ones((2, 2), bool),
    true_boxes,
    true_valid,
    0.5,
  )
  assert ap == pytest.approx(5.0 / 9.0)


def test_missed_ground_truth_halves_recall():
  ap = metrics.average_precision(*_single_image([A], [0.9], [A, B]), 0.5)
  assert ap == pytest.approx(0.5)


def test_duplicate_predictions_count_once():
  # A .9 (TP), A again .8 (FP: A is taken, IoU with B is 0), B .7 (TP):
  # (r, p) = (1/2, 1), (1/2, 1/2), (1, 2/3): AP = 1/2 + 1/2 * 2/3 = 5/6.
  # Counting the duplicate as a hit would reach recall 1 at rank 2: AP 1.
  ap = metrics.average_precision(
    *_single_image([A, A, B], [0.9, 0.8, 0.7], [A, B]), 0.5
  )
  assert ap == pytest.approx(5.0 / 6.0)


def test_a_match_goes_to_the_best_unmatched_true_box():
  # True A and B2 overlap. The first prediction is A itself; the second
  # overlaps A (IoU 90/110) more than B2 (IoU 70/130 >= 0.5), but A is taken,
  # so it matches B2: both are true positives, AP = 1.
  b2 = [0.0, 4.0, 10.0, 10.0]
  second = [0.0, 1.0, 10.0, 10.0]
  ap = metrics.average_precision(
    *_single_image([A, second], [0.9, 0.8], [A, b2]), 0.5
  )
  assert ap == pytest.approx(1.0)


def test_iou_exactly_at_the_threshold_is_a_match():
  # IoU([0, 0, 10, 10], [0, 0, 10, 20]) = 100 / 200 = 0.5 exactly.
  args = _single_image([A], [0.9], [[0.0, 0.0, 10.0, 20.0]])
  assert metrics.average_precision(*args, 0.5) == pytest.approx(1.0)
  assert metrics.average_precision(*args, 0.55) == pytest.approx(0.0)


def test_ties_in_confidence_are_one_operating_point():
  # A TP and an FP with the same score: one point (r = 1, p = 1/2), AP = 1/2,
  # whichever comes first in the arrays.
  for boxes in ([A, C], [C, A]):
    ap = metrics.average_precision(*_single_image(boxes, [0.7, 0.7], [A]), 0.5)
    assert ap == pytest.approx(0.5)


def test_unreported_predictions_and_images_without_objects():
  # Image 0: true A, found with .8. Image 1: no objects, one reported
  # prediction .9 (an FP) and an unreported one at .95 (ignored).
  # Ranking: FP .9 (p = 0), TP .8 (r = 1, p = 1/2): AP = 1/2.
  ap = metrics.average_precision(
    np.asarray([[A, C], [B, A]]),
    np.asarray([[0.8, 0.1], [0.9, 0.95]]),
    np.asarray([[True, False], [True, False]]),
    np.asarray([[A], [A]]),
    np.asarray([[True], [False]]),
    0.5,
  )
  assert ap == pytest.approx(0.5)


def test_ap_without_predictions_or_without_objects():
  none = np.zeros((2, 3), bool)
  boxes = np.zeros((2, 3, 4))
  scores = np.full((2, 3), 0.9)
  some = none.copy()
  some[0, 0] = True
  # Objects but nothing reported: 0.
  assert metrics.average_precision(boxes, scores, none, boxes, some, 0.5) == 0
  # Nothing to find, something reported: 0.
  assert metrics.average_precision(boxes, scores, some, boxes, none, 0.5) == 0
  # Nothing to find and nothing reported: 1.
  assert metrics.average_precision(boxes, scores, none, boxes, none, 0.5) == 1
  # No true-box slots at all (G = 0).
  empty = np.zeros((2, 0, 4))
  assert (
    metrics.average_precision(boxes, scores, some, empty, none[:, :0], 0.5) == 0
  )


def test_detection_metrics_by_hand():
  # Image 0: true A found by A (IoU 1). Image 1: true [0, 0, 10, 20] found by
  # [0, 0, 10, 15] (IoU 150/200 = 0.75) with a lower score.
  # AP is 1 at thresholds 0.5 ... 0.75 (6 of 10) and 1/2 above (only A
  # matches, recall 1/2 at precision 1): ap50_95 = (6 + 4 / 2) / 10 = 0.8.
  result = metrics.detection_metrics(
    np.asarray([[A], [[0.0, 0.0, 10.0, 15.0]]]),
    np.asarray([[0.9], [0.6]]),
    np.ones((2, 1), bool),
    np.asarray([[A], [[0.0, 0.0, 10.0, 20.0]]]),
    np.ones((2, 1), bool),
    counts_pred=np.asarray([1, 1]),
    counts_true=np.asarray([1, 1]),
  )
  assert result == pytest.approx(
    {
      'ap50': 1.0,
      'ap50_95': 0.8,
      'mean_iou': 0.875,
      'overcount_rate': 0.0,
      'undercount_rate': 0.0,
    }
  )
  assert all(type(v) is float for v in result.values())


def test_detection_metrics_count_rates_and_no_matches():
  boxes = np.zeros((4, 1, 4))
  result = metrics.detection_metrics(
    boxes,
    np.zeros((4, 1)),
    np.zeros((4, 1), bool),
    boxes,
    np.zeros((4, 1), bool),
    counts_pred=np.asarray([1, 2, 3, 0]),
    counts_true=np.asarray([1, 1, 4, 0]),
  )
  assert result['overcount_rate'] == 0.25
  assert result['undercount_rate'] == 0.25
  assert result['mean_iou'] == 0.0  # No matches: finite, not NaN.


def test_detection_shapes_are_checked():
  with pytest.raises(ValueError, match='true_boxes'):
    metrics.average_precision(
      np.zeros((2, 3, 4)),
      np.zeros((2, 3)),
      np.ones((2, 3), bool),
      np.zeros((2, 4, 3)),
      np.ones((2, 4), bool),
      0.5,
    )


def test_count_accuracy():
  accuracy = metrics.count_accuracy(
    np.asarray([1, 2, 3, 0]), np.asarray([1, 1, 3, 0])
  )
  assert float(accuracy) == pytest.approx(0.75)


def test_confusion_matrix_by_hand():
  true = np.asarray([0, 0, 1, 1, 1, 2, 2, 2, 2])
  inferred = np.asarray([0, 1, 1, 1, 2, 2, 2, 0, 5])  # 5 goes to column 2.
  expected = [
    [1, 1, 0],
    [0, 2, 1],
    [1, 0, 3],
  ]
  np.testing.assert_array_equal(
    metrics.confusion_matrix(true, inferred, 3), expected
  )


def test_iwae_bound_by_hand():
  # Column 0: weights 1, 2, 6, mean 3. Column 1: equal weights e^-2.
  log_weights = np.log(np.asarray([[1.0, 1.0], [2.0, 1.0], [6.0, 1.0]]))
  log_weights[:, 1] = -2.0
  np.testing.assert_allclose(
    metrics.iwae_bound(log_weights.astype(np.float32)),
    [np.log(3.0), -2.0],
    rtol=1e-6,
  )
  # One sample: the ELBO estimate itself.
  np.testing.assert_allclose(
    metrics.iwae_bound(np.asarray([[-3.5, 7.25]], np.float32)),
    [-3.5, 7.25],
  )


def test_iwae_bound_is_stable_for_large_log_weights():
  # exp(1000) overflows; the bound is 1000 + log 3 for these offsets.
  log_weights = 1000.0 + np.log(np.asarray([[1.0], [2.0], [6.0]]))
  bound = metrics.iwae_bound(log_weights.astype(np.float32))
  assert np.all(np.isfinite(bound))
  np.testing.assert_allclose(bound, [1000.0 + np.log(3.0)], rtol=1e-6)
  bound = metrics.iwae_bound(-log_weights.astype(np.float32))
  # Weights 1/1, 1/2, 1/6 times e^-1000: mean 5/9.
  np.testing.assert_allclose(bound, [-1000.0 + np.log(5.0 / 9.0)], rtol=1e-6)


def _reference_ap(pred_boxes, pred_scores, pred_valid, true_boxes, true_valid):
  """Loop-by-loop greedy matching and the VOC 2010 interpolation code.

  Assumes distinct scores (no tie groups).
  """
  ranked = []
  for m in range(pred_scores.shape[0]):
    taken = set()
    preds = [n for n in range(pred_scores.shape[1]) if pred_valid[m, n]]
    for n in sorted(preds, key=lambda n: -pred_scores[m, n]):
      best, best_iou = None, -1.0
      for g in range(true_boxes.shape[1]):
        if true_valid[m, g] and g not in taken:
          iou = float(metrics.box_iou(pred_boxes[m, n], true_boxes[m, g]))
          if iou > best_iou:
            best, best_iou = g, iou
      hit = best is not None and best_iou >= 0.5
      if hit:
        taken.add(best)
      ranked.append((pred_scores[m, n], hit))
  ranked.sort(key=lambda item: -item[0])
  tp = np.cumsum([hit for _, hit in ranked])
  rec = tp / true_valid.sum()
  prec = tp / np.arange(1, len(ranked) + 1)
  mrec = np.concatenate([[0.0], rec, [1.0]])
  mpre = np.concatenate([[0.0], prec, [0.0]])
  for i in range(len(mpre) - 2, -1, -1):
    mpre[i] = max(mpre[i], mpre[i + 1])
  i = np.where(mrec[1:] != mrec[:-1])[0]
  return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def test_ap_matches_a_loop_reference_on_random_sets():
  rng = np.random.default_rng(0)
  for _ in range(5):
    m, n, g = 20, 4, 3
    true_boxes = np.concatenate(
      [rng.uniform(0, 40, (m, g, 2)), rng.uniform(5, 15, (m, g, 2))], -1
    )
    jitter = rng.normal(0, 2.0, (m, n, 4))
    pred_boxes = true_boxes[:, [0, 1, 2, 0]] + jitter  # With a duplicate.
    pred_boxes[..., 2:] = np.abs(pred_boxes[..., 2:])
    pred_scores = rng.permutation(m * n).reshape(m, n) / (m * n)
    pred_valid = rng.random((m, n)) < 0.7
    true_valid = rng.random((m, g)) < 0.7
    args = (pred_boxes, pred_scores, pred_valid, true_boxes, true_valid)
    assert metrics.average_precision(*args, 0.5) == pytest.approx(
      _reference_ap(*args)
    )
