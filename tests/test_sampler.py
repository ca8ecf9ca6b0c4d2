import numpy as np
import pytest

from synrep.sampler import MultiPositiveBatchSampler, SamplerError


def offsets(sizes):
    return np.concatenate([[0], np.cumsum(sizes)])


def test_every_batch_is_C_groups_by_m_distinct_images():
    off = offsets([6] * 20)
    sampler = MultiPositiveBatchSampler(off, groups_per_batch=4, images_per_group=3, seed=1)
    batches = list(sampler)
    assert len(batches) == 5
    for batch in batches:
        assert len(batch) == 12 and len(set(batch)) == 12
        groups = np.searchsorted(off, batch, side="right") - 1
        values, counts = np.unique(groups, return_counts=True)
        assert len(values) == 4 and set(counts) == {3}
    all_groups = np.searchsorted(off, np.concatenate(batches), side="right") - 1
    assert len(set(all_groups.tolist())) == 20, "an epoch visits every group once"


def test_short_groups_policies_never_duplicate():
    off = offsets([4, 4, 2, 4, 1, 4])
    with pytest.raises(SamplerError, match="fewer than images_per_group"):
        MultiPositiveBatchSampler(off, 2, 3, short_groups="error")
    fewer = MultiPositiveBatchSampler(off, 2, 3, short_groups="fewer")
    for batch in fewer:
        assert len(batch) == len(set(batch))
    skip = MultiPositiveBatchSampler(off, 2, 3, short_groups="skip")
    assert len(skip) == 2
    for batch in skip:
        assert len(batch) == 6


def test_ranks_get_disjoint_groups_and_batches_are_deterministic():
    off = offsets([3] * 16)
    a = [MultiPositiveBatchSampler(off, 2, 2, seed=3, rank=r, world_size=2) for r in range(2)]
    b0 = MultiPositiveBatchSampler(off, 2, 2, seed=3, rank=0, world_size=2)
    g = [set((np.searchsorted(off, np.concatenate(list(s)), side="right") - 1).tolist()) for s in a]
    assert not g[0] & g[1]
    assert [x for x in a[0].batch(0, 0)] == [x for x in b0.batch(0, 0)]
    assert a[0].batch(0, 0).tolist() != a[0].batch(1, 0).tolist(), "a new epoch reshuffles"


def test_state_dict_resumes_mid_epoch():
    off = offsets([4] * 12)
    s = MultiPositiveBatchSampler(off, 2, 2, seed=0)
    it = iter(s)
    next(it), next(it)
    state = s.state_dict()
    rest = list(it)
    t = MultiPositiveBatchSampler(off, 2, 2, seed=0)
    t.load_state_dict(state)
    assert list(t) == rest


def test_too_few_groups_is_a_clear_error():
    with pytest.raises(SamplerError, match="usable caption groups"):
        MultiPositiveBatchSampler(offsets([2, 2]), 4, 2)
