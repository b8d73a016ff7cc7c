"""Sending a phase's instructions and collecting the replies, with deadlines that hold.

Flower's ``Grid.send_and_receive(messages, timeout=...)`` checks ``timeout`` only between two
``pull_messages`` calls, and ``HttpGrid.pull_messages`` blocks while it downloads a reply's
objects: when a node dies halfway through uploading its reply, the SuperLink already lists
the reply, and the ServerApp's pull retries (1 s back-off up to 10 s) until the SuperLink
drops the upload once its object-push session has been idle for 180 s
(``OBJECT_PUSH_SESSION_TTL_SECONDS`` in flwr 1.42). Every other reply waits too, since one
``pull_messages`` call fetches them all. So a round with such a node closes ~190 s late,
whatever ``round-timeout`` says.

:class:`BoundedGrid` replaces ``send_and_receive``: each instruction's reply is pulled on its
own daemon thread, so a stuck upload delays nobody else, and the phase closes at the first of

* every reply in;
* ``round-timeout`` seconds after sending;
* ``straggler-timeout`` seconds after ``min-nodes`` content replies are in (when set > 0).

Pulls still in flight at that moment are abandoned (their threads finish or die with the
process); what was missing, and why, is in :attr:`BoundedGrid.last_phase`.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

UPLOADING_AFTER = 0.25
"""Seconds a single pull may run before its reply counts as "in transfer" (a poll for a reply
not yet sent returns in milliseconds)."""


@dataclass
class PhaseOutcome:
    """How the last ``send_and_receive`` ended."""

    closed_because: str = ""
    """Why the phase stopped waiting, for the reasons of missing replies."""
    unsent: set[int] = field(default_factory=set)
    """Nodes whose instruction the SuperLink did not accept."""
    uploading: set[str] = field(default_factory=set)
    """Ids of instructions whose reply was listed but still being downloaded at the close."""
    seconds: float = 0.0


class BoundedGrid:
    """A Grid whose ``send_and_receive`` keeps its deadlines; everything else is delegated."""

    def __init__(self, grid: Grid, *, min_nodes: int, straggler_timeout: float, poll: float = 0.5) -> None:
        self._grid = grid
        self.min_nodes = min_nodes
        self.straggler_timeout = straggler_timeout
        self.poll = poll
        self.last_phase = PhaseOutcome()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Pushes ``messages`` and returns the replies gathered before the phase closes."""
        messages = list(messages)
        start = time.monotonic()
        ids = list(self._grid.push_messages(messages))
        outcome = PhaseOutcome()
        pending: dict[str, int] = {}
        for msg, mid in zip(messages, ids):
            if mid:
                pending[mid] = msg.metadata.dst_node_id
            else:
                outcome.unsent.add(msg.metadata.dst_node_id)
        quorum = min(self.min_nodes, len(pending))

        closed = threading.Event()
        arrived: queue.Queue[Message] = queue.Queue()
        pulling_since: dict[str, float] = {}
        for mid in pending:
            threading.Thread(
                target=self._pull_until_closed, args=(mid, closed, arrived, pulling_since),
                name=f"segviz-pull-{mid[:8]}", daemon=True,
            ).start()

        replies: list[Message] = []
        answered: set[str] = set()
        with_content = 0
        quorum_at: float | None = None
        while True:
            try:
                while True:
                    msg = arrived.get_nowait()
                    replies.append(msg)
                    answered.add(msg.metadata.reply_to_message_id)
                    with_content += int(not msg.has_error())
            except queue.Empty:
                pass
            now = time.monotonic()
            if answered >= pending.keys():
                outcome.closed_because = "every reply arrived"
                break
            if timeout is not None and now - start >= timeout:
                outcome.closed_because = f"round-timeout ({timeout:g} s)"
                break
            if quorum and with_content >= quorum and self.straggler_timeout > 0:
                quorum_at = quorum_at if quorum_at is not None else now
                if now - quorum_at >= self.straggler_timeout:
                    outcome.closed_because = (
                        f"straggler-timeout ({self.straggler_timeout:g} s after {with_content} "
                        f"replies, min-nodes {self.min_nodes})"
                    )
                    break
            time.sleep(min(0.1, self.poll))
        closed.set()
        now = time.monotonic()
        outcome.uploading = {
            mid for mid, since in list(pulling_since.items())
            if mid not in answered and now - since >= UPLOADING_AFTER
        }
        outcome.seconds = now - start
        self.last_phase = outcome
        return replies

    def _pull_until_closed(
        self, mid: str, closed: threading.Event, arrived: "queue.Queue[Message]", pulling_since: dict[str, float]
    ) -> None:
        while not closed.is_set():
            pulling_since[mid] = time.monotonic()
            try:
                got = list(self._grid.pull_messages([mid]))
            except Exception:  # noqa: BLE001 - a failed poll is retried until the phase closes
                got = []
            pulling_since.pop(mid, None)
            if closed.is_set():
                return
            if got:
                for msg in got:
                    arrived.put(msg)
                return
            closed.wait(self.poll)
