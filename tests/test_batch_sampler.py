"""Dynamic batch sampler: image budget, disjoint rank shares, exact mid-epoch resume."""

import pytest

from mapanything_ext.datasets.batch_sampler import DynamicBatchSampler

COUNTS = [4, 8, 10, 4, 6, 8, 8, 10, 4, 5, 6, 7, 9, 10, 4, 4, 8, 6, 5, 7]


def make(rank=0, world=1, budget=12, seed=3):
    return DynamicBatchSampler(len(COUNTS), COUNTS.__getitem__, budget, seed=seed, rank=rank, world_size=world)


def test_batches_never_exceed_the_image_budget_and_share_one_view_count():
    for batch in make(budget=12):
        counts = {COUNTS[i] for i in batch}
        assert len(counts) == 1
        assert len(batch) * counts.pop() <= 12
    # 4-view samples come 3 per step under a 12-image budget.
    assert max(len(b) for b in make(budget=12) if COUNTS[b[0]] == 4) == 3


def test_ranks_get_disjoint_shares_of_equal_length():
    world = 3
    shares = [list(make(rank=r, world=world)) for r in range(world)]
    assert len({len(s) for s in shares}) == 1
    seen = [i for share in shares for batch in share for i in batch]
    assert len(seen) == len(set(seen))


def test_epoch_changes_order_and_seed_fixes_it():
    a, b = make(), make()
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(make()) == list(make())


def test_state_restores_the_exact_remaining_batches():
    full = list(make(rank=1, world=2))
    sampler = make(rank=1, world=2)
    sampler.start_batch = 2
    state = sampler.state_dict()
    resumed = make(rank=1, world=2)
    resumed.load_state_dict(state)
    assert list(resumed) == full[2:]
    assert list(resumed) == full  # the offset applies to one pass only


def test_state_from_another_world_size_is_refused():
    state = make(world=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        make(world=1).load_state_dict(state)


def test_sample_over_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="max_num_of_imgs_per_gpu"):
        make(budget=8)
