"""Dynamic batch sampler: image budget, disjoint rank shares, exact mid-epoch resume."""

import pytest

from mapanything_ext.datasets.batch_sampler import DynamicBatchSampler, SamplerStateMismatch

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
    state = sampler.state_dict(consumed=4)  # two steps of two ranks done
    resumed = make(rank=1, world=2)
    assert resumed.load_state_dict(state) is None
    assert list(resumed) == full[2:]
    assert list(resumed) == full  # the offset applies to one pass only


@pytest.mark.parametrize("before,after", [(2, 3), (3, 2), (4, 1), (1, 4)])
def test_another_world_size_continues_the_epoch_with_each_remaining_batch_once(before, after):
    reference = make(world=1)
    all_batches = [tuple(b) for b in reference]
    consumed = 2 * before  # two steps of the first job
    seen_first = [tuple(b) for r in range(before) for b in list(make(rank=r, world=before))[:2]]
    state = make(world=before).state_dict(consumed=consumed)
    shares = []
    for rank in range(after):
        sampler = make(rank=rank, world=after)
        note = sampler.load_state_dict(state)
        assert f"world size changed from {before} to {after}" in note
        shares.append([tuple(b) for b in sampler])
    assert len({len(s) for s in shares}) == 1  # lockstep
    seen_second = [b for share in shares for b in share]
    seen = seen_first + seen_second
    assert len(seen) == len(set(seen))  # nothing twice
    assert set(seen) == set(all_batches[:len(seen)])  # nothing skipped: a prefix of the epoch's list
    assert len(all_batches) - len(seen) < after  # at most world_size - 1 batches dropped at the end


@pytest.mark.parametrize("change,message", [
    (dict(budget=16), "max_num_of_imgs_per_gpu was 12 when the checkpoint was written and is 16 now"),
    (dict(seed=4), "train_params.seed was 3"),
])
def test_a_position_that_means_other_samples_is_refused_naming_the_value(change, message):
    state = make(world=2).state_dict(consumed=4)
    with pytest.raises(SamplerStateMismatch, match=message):
        make(world=2, **change).load_state_dict(state)
    shorter = DynamicBatchSampler(len(COUNTS) - 1, COUNTS.__getitem__, 12, seed=3)
    with pytest.raises(SamplerStateMismatch, match="the training dataset's length was 20 when"):
        shorter.load_state_dict(state)


def test_max_steps_ends_the_epoch_early_on_every_rank():
    shares = [list(DynamicBatchSampler(len(COUNTS), COUNTS.__getitem__, 12, seed=3, rank=r, world_size=2,
                                       max_steps=2)) for r in range(2)]
    assert [len(s) for s in shares] == [2, 2]
    assert shares[0] == list(make(rank=0, world=2))[:2]


def test_sample_over_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="max_num_of_imgs_per_gpu"):
        make(budget=8)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 30])
def test_evaluation_deals_every_batch_once_whatever_the_world_size(world):
    everything = sorted(tuple(b) for b in DynamicBatchSampler(len(COUNTS), COUNTS.__getitem__, 12, shuffle=False))
    shares = [list(DynamicBatchSampler(len(COUNTS), COUNTS.__getitem__, 12, shuffle=False, rank=r, world_size=world,
                                       lockstep=False)) for r in range(world)]
    assert sorted(tuple(b) for share in shares for b in share) == everything  # nothing dropped, nothing twice
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_world_size_change_under_max_steps_uses_every_batch_of_the_epoch_once():
    two = [DynamicBatchSampler(40, lambda i: 4, 8, rank=r, world_size=2, batch_size=2, max_steps=3) for r in (0, 1)]
    for sampler in two:
        sampler.set_epoch(1)
    epoch = [batch for pair in zip(*map(list, two)) for batch in pair]
    assert len(epoch) == 6  # 3 steps x 2 ranks
    one = DynamicBatchSampler(40, lambda i: 4, 8, rank=0, world_size=1, batch_size=2, max_steps=3)
    one.load_state_dict(two[0].state_dict(consumed=2))  # one step done at world size 2
    assert list(one) == epoch[2:]  # the 4 batches left, none skipped
    one.set_epoch(2)  # the next epoch has max_steps at the new world size
    assert len(one) == 3
