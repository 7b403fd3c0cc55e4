"""Who decodes next: a bounded first-come queue of waiting requests, admitted into the live
batch as rows free up (iteration-level scheduling: each engine step, finished requests
have left and waiting ones join)."""

from __future__ import annotations

from collections import deque

from .errors import MLPSpecError
from .sequence import Request, Status


class QueueFull(MLPSpecError):
    """The waiting queue is at its bound: try again later (a server answers 503)."""


class Scheduler:
    def __init__(self, max_batch: int, max_waiting: int):
        if max_batch < 1 or max_waiting < 0:
            raise MLPSpecError(f"max_batch must be >= 1 and max_waiting >= 0, got {max_batch}, {max_waiting}")
        self.max_batch, self.max_waiting = max_batch, max_waiting
        self.waiting: deque[Request] = deque()

    def add(self, request: Request) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests are waiting already, the most this engine queues")
        self.waiting.append(request)

    def admit(self, running: int) -> list[Request]:
        """The waiting requests that join a batch of `running` rows now, oldest first."""
        joining = []
        while self.waiting and running + len(joining) < self.max_batch:
            request = self.waiting.popleft()
            request.status = Status.RUNNING
            joining.append(request)
        return joining

    def drop(self, request_id: str) -> Request | None:
        """Take a waiting request out of the queue (aborted before it ran)."""
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                return request
        return None


def prefill_groups(lengths: list[int], max_tokens: int, max_padding: float) -> list[list[int]]:
    """Which of the joining prompts (their `lengths`) share a prefill pass, as lists of
    their indices: shortest first, a group grows while its padded tokens (its size times
    its longest prompt: prompts are left-padded to it) stay within `max_tokens` and within
    1 + max_padding times its real tokens. A pass has a fixed cost beside its tokens' (on
    the default in float32 on 2 Zen 4 cores: 72 ms, and 1.4-1.6 ms a token), which a
    shared pass pays once."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        group = groups[-1] if groups else []
        size, longest = len(group) + 1, lengths[i]  # in this order the newcomer is the longest
        real = sum(lengths[j] for j in group) + lengths[i]
        if group and size * longest <= max_tokens and size * longest <= (1 + max_padding) * real:
            group.append(i)
        else:
            groups.append([i])
    return groups
