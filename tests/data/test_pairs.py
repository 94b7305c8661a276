"""sample_pairs / check_pairs."""

from __future__ import annotations

import numpy as np
import pytest

from invsim.data.pairs import check_pairs, sample_pairs


def test_pairs_differ_in_label_targets_unique_and_deterministic():
    labels = np.repeat(np.arange(5), 20)
    s, t = sample_pairs(labels, 60, rng_seed=3)
    assert len(set(t.tolist())) == 60  # without replacement
    assert np.all(labels[s] != labels[t])
    s2, t2 = sample_pairs(labels, 60, rng_seed=3)
    assert np.array_equal(s, s2) and np.array_equal(t, t2)
    s3, _ = sample_pairs(labels, 60, rng_seed=4)
    assert not np.array_equal(s, s3)


def test_seed_is_uniform_over_other_classes():
    # target class 0 has 10 examples; other classes 1 (10 examples) and 2 (80 examples):
    # a uniform seed over examples picks class 2 about 8 times as often as class 1
    labels = np.array([0] * 10 + [1] * 10 + [2] * 80)
    counts = np.zeros(3)
    for seed in range(200):
        s, t = sample_pairs(labels, 100, rng_seed=seed)
        counts += np.bincount(labels[s[labels[t] == 0]], minlength=3)
    assert counts[0] == 0
    assert 6.5 < counts[2] / counts[1] < 9.5


def test_more_pairs_than_data_warns_and_replaces():
    labels = np.array([0, 1, 0, 1])
    with pytest.warns(UserWarning, match="with replacement"):
        s, t = sample_pairs(labels, 10, rng_seed=0)
    assert len(t) == 10 and np.all(labels[s] != labels[t])


def test_single_class_is_an_error():
    with pytest.raises(ValueError, match="single class"):
        sample_pairs(np.zeros(10, dtype=int), 3)


def test_check_pairs_names_positions():
    check_pairs([0, 1, 2], [1, 2, 0])
    with pytest.raises(ValueError, match=r"2 seed/target pairs share a label, at positions 1 "):
        check_pairs([0, 1, 2, 3], [1, 1, 0, 3])
