"""The waiting jobs in memory: a cache of the queued rows, ordered fairly.

Users take turns, least recently served first (a user never served goes before one who was); each
user's jobs go oldest first, always, batching included: a batch may take a user's next job only.
"""

from __future__ import annotations

import bisect
from collections.abc import Hashable, Mapping

from bot.jobs.models import Job


def batch_key(job: Job) -> Hashable | None:
    """Jobs with equal keys can be generated together; None: this job runs alone."""
    return job.request.batch_key() if job.batchable else None


class FairQueue:
    """``last_served`` and ``turn`` come from the store, so every worker that claims agrees on turns."""

    def __init__(self, last_served: Mapping[int, int] | None = None, turn: int = 0) -> None:
        self._by_user: dict[int, list[Job]] = {}
        self._where: dict[int, int] = {}
        self._last_served: dict[int, int] = dict(last_served or {})
        self._turn = max(turn, max(self._last_served.values(), default=0))

    @property
    def turn(self) -> int:
        """The number of the latest batch taken (it grows by one per ``next_batch``)."""
        return self._turn

    def last_served(self, user_id: int) -> int | None:
        return self._last_served.get(user_id)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._where

    def push(self, job: Job) -> None:
        if job.id in self._where:
            return
        jobs = self._by_user.setdefault(job.user_id, [])
        bisect.insort(jobs, job, key=_job_id)
        self._where[job.id] = job.user_id

    def remove(self, job_id: int) -> Job | None:
        user_id = self._where.pop(job_id, None)
        if user_id is None:
            return None
        jobs = self._by_user[user_id]
        index = next(i for i, job in enumerate(jobs) if job.id == job_id)
        job = jobs.pop(index)
        if not jobs:
            del self._by_user[user_id]
        return job

    def jobs_of(self, user_id: int) -> list[Job]:
        return list(self._by_user.get(user_id, ()))

    def users_in_turn(self) -> list[int]:
        """Users with waiting jobs, the one whose turn it is first."""
        return sorted(
            self._by_user, key=lambda user: (self._last_served.get(user, -1), self._by_user[user][0].id)
        )

    def order(self) -> list[Job]:
        """Every waiting job in the order it would be served: one per user per round."""
        users = self.users_in_turn()
        rounds = max((len(self._by_user[user]) for user in users), default=0)
        return [
            self._by_user[user][i] for i in range(rounds) for user in users if i < len(self._by_user[user])
        ]

    def next_batch(self, max_rows: int) -> list[Job]:
        """Take the next job and the compatible jobs that follow it fairly, up to ``max_rows`` tracks."""
        users = self.users_in_turn()
        if not users:
            return []
        head = self._by_user[users[0]][0]
        batch = [head]
        key = batch_key(head)
        if key is not None:
            batch += self._companions(key, users, max_rows - head.request.variations)
        self._turn += 1
        for job in batch:
            self.remove(job.id)
            self._last_served[job.user_id] = self._turn
        return batch

    def _companions(self, key: Hashable, users: list[int], room: int) -> list[Job]:
        # Round-robin from the user after the head's; a user whose next job does not fit is done.
        taken = {user: 0 for user in users}
        taken[users[0]] = 1
        open_users = users[1:] + users[:1]
        found: list[Job] = []
        while room > 0 and open_users:
            for user in list(open_users):
                jobs = self._by_user[user]
                position = taken[user]
                job = jobs[position] if position < len(jobs) else None
                if job is None or batch_key(job) != key or job.request.variations > room:
                    open_users.remove(user)
                    continue
                found.append(job)
                taken[user] += 1
                room -= job.request.variations
                if room <= 0:
                    break
        return found


def _job_id(job: Job) -> int:
    return job.id
