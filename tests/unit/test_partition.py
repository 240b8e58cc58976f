"""The shard map (client/partition.py): pure, covering, contiguous, balanced, and strict about its input."""
from __future__ import annotations

import math
import random

import pytest

from optserve.client.partition import partition

SLICE = 128  # a multiple of hyper.CUT_ELEMENTS, so it is used as given

# Odd sizes around the slice boundary, an empty tensor and a scalar, in a non-sorted name order.
SHAPES = [
    ("z.one", (1,)),
    ("a.seven", (7,)),
    ("m.slice_minus_one", (SLICE - 1,)),
    ("b.slice", (SLICE,)),
    ("y.slice_plus_one", (SLICE + 1,)),
    ("c.three_slices_and_5", (3 * SLICE + 5,)),
    ("x.matrix", (5, 7)),
    ("d.empty", (0, 4)),
    ("w.scalar", ()),
]


def _by_key(placements):
    return {p.key: p for p in placements}


def _loads(placements, num_shards):
    load = [0] * num_shards
    for p in placements:
        load[p.shard] += p.numel
    return load


def test_the_same_input_gives_the_same_placements():
    first = partition(SHAPES, 3, SLICE)

    second = partition(list(SHAPES), 3, SLICE)

    assert first == second


def test_the_order_of_the_names_does_not_change_where_a_key_lands():
    shuffled = list(SHAPES)
    random.Random(0).shuffle(shuffled)

    placed = _by_key(partition(shuffled, 3, SLICE))

    assert placed == _by_key(partition(SHAPES, 3, SLICE))


def test_placements_come_back_in_parameter_order_with_slices_in_order():
    shuffled = list(reversed(SHAPES))

    placements = partition(shuffled, 2, SLICE)

    params = list(dict.fromkeys(p.param for p in placements))
    assert params == [n for n, _ in shuffled]
    for name, _ in shuffled:
        starts = [p.start for p in placements if p.param == name]
        assert starts == sorted(starts)


def test_the_input_is_not_modified():
    shapes = [(n, list(s)) for n, s in SHAPES]
    before = [(n, list(s)) for n, s in shapes]

    partition(shapes, 2, SLICE)

    assert shapes == before


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_every_element_of_every_parameter_is_covered_exactly_once(num_shards):
    placements = partition(SHAPES, num_shards, SLICE)

    for name, shape in SHAPES:
        numel = math.prod(shape)
        mine = sorted((p for p in placements if p.param == name), key=lambda p: p.start)
        covered = [i for p in mine for i in range(p.start, p.stop)]
        assert covered == list(range(numel)), name
        assert len(mine) >= 1, name  # an empty tensor still has its (empty) key


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_large_tensors_become_contiguous_named_slices_of_at_most_slice_elements(num_shards):
    placements = partition(SHAPES, num_shards, SLICE)

    for name, shape in SHAPES:
        numel = math.prod(shape)
        mine = [p for p in placements if p.param == name]
        if numel <= SLICE:
            assert [(p.key, p.start, p.stop, p.shape) for p in mine] == [(name, 0, numel, shape)]
        else:
            assert [p.key for p in mine] == [f"{name}[{p.start}:{p.stop}]" for p in mine]
            assert all(p.shape == (p.numel,) and 1 <= p.numel <= SLICE for p in mine)
            assert [p.start for p in mine] == list(range(0, numel, SLICE))


def test_a_tensor_of_exactly_slice_elements_stays_whole_and_one_more_is_cut_in_two():
    placements = _by_key(partition([("a", (SLICE,)), ("b", (SLICE + 1,))], 1, SLICE))

    assert sorted(placements) == ["a", f"b[0:{SLICE}]", f"b[{SLICE}:{SLICE + 1}]"]


def test_a_scalar_keeps_its_empty_shape():
    (p,) = partition([("s", ())], 2, SLICE)

    assert (p.key, p.shape, p.start, p.stop) == ("s", (), 0, 1)


@pytest.mark.parametrize("num_shards", [1, 2, 3])
def test_shard_loads_differ_by_at_most_the_largest_key(num_shards):
    placements = partition(SHAPES, num_shards, SLICE)

    load = _loads(placements, num_shards)
    assert max(load) - min(load) <= max(p.numel for p in placements)
    assert sum(load) == sum(math.prod(s) for _, s in SHAPES)
    assert {p.shard for p in placements} <= set(range(num_shards))


def test_many_parameters_of_random_sizes_stay_balanced_on_three_shards():
    rng = random.Random(1)
    shapes = [(f"p{i}", (rng.randint(0, 5 * SLICE),)) for i in range(200)]

    placements = partition(shapes, 3, SLICE)

    load = _loads(placements, 3)
    assert max(load) - min(load) <= SLICE


def test_slices_spread_over_all_shards():
    placements = partition([("big", (4 * SLICE,))], 3, SLICE)

    assert [p.shard for p in placements] == [0, 1, 2, 0]


def test_a_duplicate_name_is_refused():
    with pytest.raises(ValueError, match="'a' appears twice"):
        partition([("a", (3,)), ("b", (2,)), ("a", (3,))], 1, SLICE)


@pytest.mark.parametrize("num_shards", [0, -1])
def test_fewer_than_one_shard_is_refused(num_shards):
    with pytest.raises(ValueError, match=f"num_shards must be >= 1, got {num_shards}"):
        partition(SHAPES, num_shards, SLICE)


@pytest.mark.parametrize("slice_elements", [0, -5])
def test_slice_elements_below_one_is_refused(slice_elements):
    with pytest.raises(ValueError, match=f"slice_elements must be >= 1, got {slice_elements}"):
        partition(SHAPES, 1, slice_elements)


def test_slice_elements_is_rounded_up_to_the_cut_grid():
    placements = partition([("w", (200,))], 1, slice_elements=50)

    assert [(p.start, p.stop) for p in placements] == [(0, 64), (64, 128), (128, 192), (192, 200)]
