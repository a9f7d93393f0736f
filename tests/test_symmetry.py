"""Point groups (RELION generator axes), the symmetry convention on the shared D2 map, angular distances."""

from __future__ import annotations

import importlib.util
import itertools

import mrcfile
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from cryorefine.geometry.euler import euler_to_matrix, matrix_to_euler
from cryorefine.geometry.symmetry import (angular_error_deg, relion_angular_distance_deg, rotation_about_axis,
                                          symmetry_matrices, symmetry_order, view_error_deg)

ORDERS = {"C1": 1, "C2": 2, "C3": 3, "C7": 7, "D1": 2, "D2": 4, "D3": 6, "D12": 24,
          "T": 12, "O": 24, "I": 60, "I1": 60, "I2": 60, "I3": 60, "I4": 60}


def _rotation_angles(mats: np.ndarray) -> np.ndarray:
    return np.rad2deg(np.arccos(np.clip((np.trace(mats, axis1=1, axis2=2) - 1) / 2, -1, 1)))


def _random_rotations(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return euler_to_matrix(rng.uniform(-180, 180, n), np.rad2deg(np.arccos(rng.uniform(-1, 1, n))),
                           rng.uniform(-180, 180, n))


@pytest.mark.parametrize("name", sorted(ORDERS))
def test_group_order_closure_and_proper(name):
    g = symmetry_matrices(name)
    assert len(g) == ORDERS[name] == symmetry_order(name)
    np.testing.assert_array_equal(g[0], np.eye(3))
    np.testing.assert_allclose(g @ np.transpose(g, (0, 2, 1)), np.broadcast_to(np.eye(3), g.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(g), 1.0, atol=1e-12)
    flat = g.reshape(len(g), 9)
    for a, b in itertools.product(g, g):
        # closure: every product is (to 1e-12) one of the elements
        assert np.abs(flat - (a @ b).ravel()).max(axis=1).min() < 1e-12
    # all elements distinct
    d = np.abs(flat[:, None, :] - flat[None, :, :]).max(axis=2) + np.eye(len(g))
    assert d.min() > 1e-3


def test_names_case_insensitive_and_unknown_groups():
    np.testing.assert_array_equal(symmetry_matrices("d2"), symmetry_matrices("D2"))
    np.testing.assert_array_equal(symmetry_matrices("i"), symmetry_matrices("I2"))
    for bad in ["C2v", "Oh", "D2h", "Ci", "Cs", "S4", "I5", "C0", "X", "", "C100"]:
        with pytest.raises(ValueError, match=f"{bad}: unknown or unsupported point group"):
            symmetry_matrices(bad)


def test_d2_has_twofolds_about_x_y_z():
    g = symmetry_matrices("D2")
    expected = [np.diag([1.0, -1.0, -1.0]), np.diag([-1.0, 1.0, -1.0]), np.diag([-1.0, -1.0, 1.0])]
    for e in expected:
        assert any(np.array_equal(r, e) for r in g), e


def test_generator_axes_and_element_angles():
    # Element census by rotation angle: T = 3 twofolds + 8 threefold turns, O adds fourfolds, I has 15/20/24.
    census = {"T": {180: 3, 120: 8}, "O": {90: 6, 180: 9, 120: 8},
              "I": {180: 15, 120: 20, 72: 12, 144: 12}, "I3": {180: 15, 120: 20, 72: 12, 144: 12}}
    for name, want in census.items():
        ang = np.round(_rotation_angles(symmetry_matrices(name)[1:])).astype(int)
        assert dict(zip(*np.unique(ang, return_counts=True))) == want
    # O: fourfolds along x, y, z; I2: twofold on z; I3 and I4: fivefold on z; I1: twofold on x.
    for name, axis, fold in [("O", (1, 0, 0), 4), ("O", (0, 1, 0), 4), ("O", (0, 0, 1), 4), ("I2", (0, 0, 1), 2),
                             ("I3", (0, 0, 1), 5), ("I4", (0, 0, 1), 5), ("I1", (1, 0, 0), 2),
                             ("T", (0, 0, 1), 3), ("C7", (0, 0, 1), 7)]:
        r = rotation_about_axis(axis, 360.0 / fold)
        assert np.abs(symmetry_matrices(name) - r).max(axis=(1, 2)).min() < 1e-8, (name, axis)


@pytest.fixture(scope="module")
def d2_map(bench_dir):
    return mrcfile.read(bench_dir / "maps" / "d2tet_small_b64_a2.5.mrc").astype(np.float64)


def _resample(vol: np.ndarray, m: np.ndarray) -> np.ndarray:
    """W(x) = V(m·x), x = (x, y, z) about the centre voxel N//2, trilinear, array order [z, y, x]."""
    n = vol.shape[0]
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    xyz = np.stack([x.ravel(), y.ravel(), z.ravel()])
    src = m @ xyz + n // 2
    return map_coordinates(vol, src[::-1], order=1, mode="grid-wrap").reshape(vol.shape)


def test_d2_map_is_invariant_under_each_operator(d2_map):
    vmax = np.abs(d2_map).max()
    for r in symmetry_matrices("D2"):
        assert np.abs(_resample(d2_map, r) - d2_map).max() < 1e-5 * vmax
    # The same check on the raw grid: a 2-fold about x is the flip of the y and z axes around index N//2.
    flip = lambda a, ax: np.roll(np.flip(a, ax), 1, ax)  # noqa: E731  index i -> N - i = 2·(N//2) - i
    assert np.abs(flip(flip(d2_map, 0), 1) - d2_map).max() < 1e-5 * vmax
    # negative control: a 2-fold about the xy diagonal is not a symmetry of this map
    diag = rotation_about_axis((1, 1, 0), 180.0)
    assert np.abs(_resample(d2_map, diag) - d2_map).max() > 0.1 * vmax


def _project(vol: np.ndarray, a: np.ndarray) -> np.ndarray:
    """p(x, y) = Σ_z V(Aᵀ (x, y, z)), the bench README's projection convention."""
    n = vol.shape[0]
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    xyz = np.stack([x.ravel(), y.ravel(), z.ravel()])
    src = a.T @ xyz + n // 2
    # grid-wrap makes index i and N - i equivalent, so the grid flips are exact symmetries of the sampling too
    return map_coordinates(vol, src[::-1], order=1, mode="grid-wrap").reshape(vol.shape).sum(axis=0)


def test_a_and_a_r_give_the_same_projection(d2_map):
    a = euler_to_matrix(37.0, 61.0, -112.0)
    p = _project(d2_map, a)
    scale = np.abs(p).max()
    for r in symmetry_matrices("D2")[1:]:
        assert np.abs(_project(d2_map, a @ r) - p).max() < 1e-5 * scale
        # R·A is not equivalent (it mirrors the image)
        assert np.abs(_project(d2_map, r @ a) - p).max() > 0.05 * scale


def test_euler_round_trip():
    a = _random_rotations(500, 1)
    rot, tilt, psi = matrix_to_euler(a)
    np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), a, atol=1e-10)
    assert tilt.min() >= 0 and tilt.max() <= 180


def test_angular_error_known_answers():
    n = 200
    rng = np.random.default_rng(2)
    a_true = _random_rotations(n, 3)
    for name in ["C1", "D2", "O", "I3"]:
        g = symmetry_matrices(name)
        theta = rng.uniform(0.0, 20.0, n)
        axes = rng.normal(size=(n, 3))
        delta = np.array([rotation_about_axis(ax, t) for ax, t in zip(axes, theta)])
        pick = g[rng.integers(0, len(g), n)]
        a_est = delta @ a_true @ pick                        # a symmetry mate, rotated by theta
        np.testing.assert_allclose(angular_error_deg(a_est, a_true, g), theta, atol=1e-6)
        np.testing.assert_allclose(relion_angular_distance_deg(a_true @ pick, a_true, g), 0.0, atol=1e-5)


def test_angular_error_matches_bench_score(bench_dir):
    spec = importlib.util.spec_from_file_location("bench_score", bench_dir / "score.py")
    score = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score)
    a, b = _random_rotations(300, 4), _random_rotations(300, 5)
    for name in ["C1", "C3", "D2", "T", "O", "I", "I1", "I4"]:
        ref = score.angle_between(a[:, None], np.einsum("nij,gjk->ngik", b, score.symmetry_group(name))).min(1)
        np.testing.assert_allclose(angular_error_deg(a, b, symmetry_matrices(name)), ref, atol=1e-4)


def test_relion_angular_distance_and_view_error():
    a = _random_rotations(50, 6)
    g1 = symmetry_matrices("C1")
    # psi + 6 deg: rows 0 and 1 turn by 6 deg, the viewing direction (row 2) not at all -> mean 4 deg
    rot, tilt, psi = matrix_to_euler(a)
    b = euler_to_matrix(rot, tilt, psi + 6.0)
    np.testing.assert_allclose(relion_angular_distance_deg(a, b, g1), 4.0, atol=1e-9)
    np.testing.assert_allclose(view_error_deg(b, a, g1), 0.0, atol=1e-6)
    np.testing.assert_allclose(angular_error_deg(b, a, g1), 6.0, atol=1e-9)
    # tilt + 5 deg (away from the poles) moves the viewing direction by exactly 5 deg
    b2 = euler_to_matrix(rot, np.clip(tilt, 10, 170) + 5.0, psi)
    a2 = euler_to_matrix(rot, np.clip(tilt, 10, 170), psi)
    np.testing.assert_allclose(view_error_deg(b2, a2, g1), 5.0, atol=1e-9)
    # symmetric in its arguments
    c = _random_rotations(50, 7)
    gd = symmetry_matrices("D2")
    np.testing.assert_allclose(relion_angular_distance_deg(a, c, gd), relion_angular_distance_deg(c, a, gd),
                               atol=1e-9)
