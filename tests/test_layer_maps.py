"""KD3 layer maps: which student hidden state is matched with which teacher hidden state."""

from __future__ import annotations

import pytest

from kdlab.losses import derived_layer_map, resolve_layer_map


def test_derived_map_pairs_each_block_with_its_source() -> None:
    # A 6-layer student copied from these teacher blocks (of 24) is matched with exactly those blocks,
    # not with the evenly spaced ones a uniform map would pick.
    layers = [0, 5, 10, 14, 19, 23]
    assert derived_layer_map(layers, 24) == [(1, 1), (2, 6), (3, 11), (4, 15), (5, 20), (6, 24)]
    assert resolve_layer_map("uniform", 6, 24) == [(1, 4), (2, 8), (3, 12), (4, 16), (5, 20), (6, 24)]


def test_derived_map_leaves_out_a_last_pair_that_would_mix_normed_and_unnormed_states() -> None:
    # The student's last hidden state is after the final norm; teacher block 2's output (of 4) is not.
    assert derived_layer_map([0, 1, 2], 4) == [(1, 1), (2, 2)]


def test_derived_map_rejects_blocks_the_teacher_lacks() -> None:
    with pytest.raises(ValueError, match="teacher blocks 0..3"):
        derived_layer_map([0, 4], 4)
