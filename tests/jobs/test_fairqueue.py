"""The in-memory queue alone: turns across users, order within a user, batches that fit."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from itertools import count

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.jobs import Job, JobKind, JobState, Origin
from bot.jobs.fairqueue import FairQueue, batch_key
from tests.jobs.fakes import request

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def job(
    job_id: int, user: int, duration: float = 2.0, variations: int = 1, kind: JobKind = JobKind.NEW
) -> Job:
    return Job(
        id=job_id,
        origin=Origin(user),
        kind=kind,
        request=request(f"job {job_id}", duration=duration, variations=variations, seed=job_id),
        state=JobState.QUEUED,
        created_at=NOW,
    )


def drain(queue: FairQueue, max_rows: int) -> list[list[Job]]:
    batches = []
    while batch := queue.next_batch(max_rows):
        batches.append(batch)
    return batches


def test_a_user_never_served_goes_before_one_who_was() -> None:
    queue = FairQueue()
    ids = count(1)
    for _ in range(3):
        queue.push(job(next(ids), user=1))
    assert [j.id for j in queue.next_batch(1)] == [1]
    queue.push(job(next(ids), user=2))

    assert [j.user_id for j in queue.order()] == [2, 1, 1]


def test_an_extension_is_batched_with_nothing() -> None:
    queue = FairQueue()
    queue.push(job(1, user=1, kind=JobKind.EXTEND))
    queue.push(job(2, user=2))

    assert [[j.id for j in b] for b in drain(queue, 4)] == [[1], [2]]


def test_a_removed_job_is_not_served() -> None:
    queue = FairQueue()
    for job_id in (1, 2, 3):
        queue.push(job(job_id, user=job_id))
    removed = queue.remove(2)

    assert removed is not None and removed.id == 2
    assert 2 not in queue
    assert [j.id for b in drain(queue, 1) for j in b] == [1, 3]


jobs_strategy = st.lists(
    st.tuples(st.integers(0, 4), st.sampled_from([2.0, 3.0]), st.integers(1, 3)), min_size=1, max_size=30
)


@settings(max_examples=150, deadline=None)
@given(specs=jobs_strategy, max_rows=st.integers(1, 5))
def test_every_job_is_served_once_in_its_users_order_in_batches_that_fit(
    specs: list[tuple[int, float, int]], max_rows: int
) -> None:
    queue = FairQueue()
    for job_id, (user, duration, variations) in enumerate(specs, start=1):
        queue.push(job(job_id, user, duration, variations))

    batches = drain(queue, max_rows)
    served = [j for batch in batches for j in batch]

    assert sorted(j.id for j in served) == list(range(1, len(specs) + 1))
    for user in {j.user_id for j in served}:
        ids = [j.id for j in served if j.user_id == user]
        assert ids == sorted(ids)
    for batch in batches:
        assert len({batch_key(j) for j in batch}) == 1
        assert len(batch) == 1 or sum(j.request.variations for j in batch) <= max_rows


@settings(max_examples=150, deadline=None)
@given(users=st.lists(st.integers(0, 5), min_size=1, max_size=30))
def test_one_at_a_time_users_take_strict_turns(users: list[int]) -> None:
    queue = FairQueue()
    for job_id, user in enumerate(users, start=1):
        queue.push(job(job_id, user))
    total = Counter(users)
    served: Counter[int] = Counter()

    for batch in drain(queue, 1):
        served[batch[0].user_id] += 1
        still_waiting = [u for u in total if served[u] < total[u]]
        # No user who still waits is more than one turn behind anyone.
        assert all(served[batch[0].user_id] <= served[u] + 1 for u in still_waiting)
