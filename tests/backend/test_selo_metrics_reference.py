"""SeLo metrics against a transcription of the original evaluation code, on random cases (within 1e-3).

``ReferenceSLM`` below follows the ``SLM`` class of xiaoyuan1996/SemanticLocalizationMetrics
(``evaluations/SLM.py``, also in om-ai-lab/RS5M ``inference/inference_tool.py``) line by line: ``reduce`` sums
and ``int`` truncations, ``cv2.fillPoly`` on int32 vertices, ``cv2.boxFilter``, scipy's ``maximum_filter``. Its
one substitution: skimage is not installed, so the components' centroids come from OpenCV's
``connectedComponentsWithStats`` (8-connected, like ``measure.label(connectivity=2)``) instead of
``regionprops``; the order of the centres does not enter any metric.
"""
from functools import reduce

import cv2
import numpy as np
import pytest
from scipy.ndimage import maximum_filter

from backend.evaluation import selo


class ReferenceSLM:
    rsu_beta, rsu_eps, ras_expand_factor, ras_filter_times, ras_scala_beta, rda_eta = 0.707, 1e-7, 1.5, 5, 3, 0.5
    rmi_wsu, rmi_was, rmi_wda = 0.4, 0.35, 0.25

    def generate_mask_by_points(self, prob, points_list):
        H, W = prob.shape
        mask = np.zeros((H, W))
        points_list = [np.array(i, np.int32) for i in points_list]
        cv2.fillPoly(mask, points_list, 1)
        return mask

    def _get_region_center_radius(self, region_point):
        mid_x = int(reduce(lambda x, y: x + y, np.array(region_point)[:, 0]) / len(region_point))
        mid_y = int(reduce(lambda x, y: x + y, np.array(region_point)[:, 1]) / len(region_point))
        radius = int(np.mean([np.linalg.norm(np.array(point) - np.array([mid_x, mid_y]))
                              for point in region_point]) * self.ras_expand_factor)
        return mid_x, mid_y, radius

    def _get_prob_center_in_gray(self, prob):
        gray_img = np.asarray(prob * 255.0, dtype=np.uint8)
        for _ in range(self.ras_filter_times):
            gray_img = cv2.boxFilter(gray_img, ddepth=-1, ksize=(50, 50))
        mx = maximum_filter(gray_img, size=1000)
        gray_img = np.where(mx == gray_img, gray_img, 0)
        gray_img = np.asarray(gray_img > 0, np.uint8) * 255
        n, _, _, centroids = cv2.connectedComponentsWithStats(gray_img, connectivity=8)
        centers = [[int(i) for i in c] for c in centroids[1:]]  # (x, y), truncated like [int(i) ...][::-1]
        v_center = [[c[0], c[1], prob[c[1]][c[0]]] for c in centers]
        v_center.sort(key=lambda x: x[2], reverse=True)
        centers = list(map(lambda x: x[:2], v_center))
        return [i for i in centers if prob[i[1]][i[0]] >= 0.5]

    def ras(self, region_lists, prob):
        centers_and_radius = [self._get_region_center_radius(i) for i in region_lists]
        prob_centers = self._get_prob_center_in_gray(prob)
        if len(prob_centers) == 0:
            offsets = [centers_and_radius[0][2]]
        else:
            offsets = []
            for x, y, r in centers_and_radius:
                dises = list(map(lambda p: np.linalg.norm(np.array([x, y] - np.array(p))), prob_centers))
                dises = list(filter(lambda d: d <= r, dises))
                offsets.append(np.mean(dises) if len(dises) != 0 else r)
        granular_offet = np.mean([off / v[2] for off, v in zip(offsets, centers_and_radius)])
        return (np.exp(self.ras_scala_beta * granular_offet) - 1) / (np.exp(self.ras_scala_beta) - 1)

    def rsu(self, prob, mask):
        all_mask_value = np.sum(np.multiply(prob, mask))
        all_value = np.sum(prob)
        H, W = np.shape(mask)
        all_mask = np.sum(mask)
        left_frac = all_mask_value / (all_value - all_mask_value + self.rsu_eps)
        right_frac = (H * W - all_mask) / all_mask
        return -np.exp(-1 * self.rsu_beta * left_frac * right_frac) + 1

    def rda(self, region_lists, prob):
        centers_and_radius = [self._get_region_center_radius(i) for i in region_lists]
        prob_centers = self._get_prob_center_in_gray(prob)
        rda = []
        for x, y, r in centers_and_radius:
            backup_points = list(filter(lambda p: np.linalg.norm(np.array([x, y] - np.array(p))) <= r, prob_centers))
            if len(backup_points) <= 1:
                rda.append(float(len(backup_points)))
                continue
            centers_attention = np.average(backup_points, axis=0)
            dises = list(map(lambda p: np.linalg.norm(np.array(centers_attention - np.array(p))), backup_points))
            rda.append(0.5 * (1 - np.mean(dises) / r) + np.exp(- self.rda_eta * (len(backup_points) + 2)))
        return np.mean(rda)

    def evaluate(self, prob, region_list):
        mask = self.generate_mask_by_points(prob, region_list)
        rsu, ras, rda = self.rsu(prob, mask), self.ras(region_list, prob), self.rda(region_list, prob)
        return {"rsu": rsu, "ras": ras, "rda": rda,
                "rmi": self.rmi_wsu * rsu + self.rmi_was * (1 - ras) + self.rmi_wda * rda}


def _random_case(rng):
    """A grey probability map (as the reference reads it: k / 255) of a few blobs, and 1-3 quadrilaterals with
    float vertices, some of them near the blobs."""
    h, w = int(rng.integers(200, 700)), int(rng.integers(200, 700))
    yy, xx = np.mgrid[0:h, 0:w]
    p = rng.random() * 0.2 * np.ones((h, w))
    blobs = []
    for _ in range(int(rng.integers(1, 4))):
        cx, cy, s = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(15, 90)
        p += rng.uniform(0.3, 1.0) * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * s * s))
        blobs.append((cx, cy))
    p += rng.normal(0, 0.02, p.shape)
    p = (p - p.min()) / (p.max() - p.min())
    grey = np.uint8(255 * p)
    regions = []
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = blobs[int(rng.integers(len(blobs)))] if rng.random() < 0.7 else (rng.uniform(0, w), rng.uniform(0, h))
        half = rng.uniform(8, 80, size=2)
        quad = [[cx - half[0], cy - half[1]], [cx + half[0], cy - half[1] * rng.uniform(0.6, 1.0)],
                [cx + half[0] * rng.uniform(0.6, 1.0), cy + half[1]], [cx - half[0], cy + half[1]]]
        regions.append([[float(np.clip(x, 0, w - 1)), float(np.clip(y, 0, h - 1))] for x, y in quad])
    return grey / 255.0, regions


@pytest.mark.parametrize("seed", range(12))
def test_metrics_equal_the_original_code_on_random_cases(seed):
    prob, regions = _random_case(np.random.default_rng(seed))
    theirs = ReferenceSLM().evaluate(prob, regions)
    ours = selo.selo_metrics(prob, regions)
    for k in ("rsu", "ras", "rda", "rmi"):
        assert abs(ours[k] - float(theirs[k])) <= 1e-3, (k, ours[k], theirs[k])


def test_the_truncations_matter():
    """A case where the float centre and radius (the earlier implementation) move Rsu's mask or Ras: the
    reference's integers are what the published numbers were measured with."""
    region = [[10.9, 10.9], [40.9, 10.9], [40.9, 40.9], [10.9, 40.9]]
    assert selo.region_geometry(region) == ReferenceSLM()._get_region_center_radius(region) == (25, 25, 31)
    mask = selo.polygon_mask((60, 60), [region])
    assert mask.sum() == 31 * 31  # vertices cast to int32 (10..40), boundary included


def test_jpeg_round_trip_reads_like_the_reference(tmp_path):
    rng = np.random.default_rng(5)
    prob = cv2.GaussianBlur(rng.random((120, 160)), (0, 0), 8)
    prob = (prob - prob.min()) / (prob.max() - prob.min())
    path = tmp_path / "probmap_0.jpg"
    cv2.imwrite(str(path), np.uint8(255 * prob))
    expected = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) / 255.0
    np.testing.assert_array_equal(selo.jpeg_round_trip(prob), expected)
    np.testing.assert_array_equal(selo.read_heatmap(path), expected)
