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
