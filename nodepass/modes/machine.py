"""What the connection state machines of a dual-end tunnel share: an
``Enum`` of states, an ``Enum`` of inputs, and one explicit table that says,
for each (state, input), the next state and the output to run.

Why a table and not ``automat`` (which Twisted already brings along):

* The table *is* the specification, in one place, and it is data: a test
  walks every (state, input) pair of it, so "every state and every input"
  is checked rather than hoped for.  ``automat`` hides the current state by
  design and raises ``NoTransition`` at run time for a pair nobody declared;
  on a network connection late events are normal (a timer that fires as
  the peer closes, bytes that arrive after we decided to close), so here a
  pair the table does not list means "nothing to do in this state", said
  once, in :meth:`TableMachine._fire`.
* The state is a plain ``Enum`` member that tests and debug sessions can
  read; nothing outside a machine branches on it (the runner sends inputs).
* A machine is one small slotted object per connection and an input is a
  dict look-up: the per-chunk relay path never passes through it anyway.

A machine owns at most one timer, and the timer belongs to the state that
started it: any move to another state cancels it.  So "the handshake
timeout cannot fire after the handshake" holds by construction, not by a
check in every timeout handler.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable, Generic, Mapping, Optional, TypeVar

from nodepass.base.timers import Call, ClockLike

S = TypeVar("S", bound=Enum)
I = TypeVar("I", bound=Enum)

#: What a row of a table runs: an unbound method of the machine, called with
#: the machine and the input's arguments.
Output = Callable[..., None]

#: ``{(state, input): (next state, output or None)}``.
Table = Mapping[tuple[S, I], tuple[S, Optional[Output]]]


class TableMachine(Generic[S, I]):
    """A state, the table that moves it, and the state's timer."""

    __slots__ = ("state", "_table", "_clock", "_timer")

    def __init__(self, table: Table[S, I], initial: S, clock: ClockLike):
        self.state: S = initial
        self._table = table
        self._clock = clock
        self._timer: Optional[Call] = None

    def _fire(self, event: I, *args: Any) -> None:
        """Feed one input.  The new state is set before the output runs, so
        an output may feed the next input itself (``_sniff`` judging the
        bytes it collected, say) and that input sees the new state."""
        step = self._table.get((self.state, event))
        if step is None:
            return  # the input means nothing in this state: a late event
        new, output = step
        if new is not self.state:
            self._cancel_timer()
        self.state = new
        if output is not None:
            output(self, *args)

    # -- the state's timer ----------------------------------------------
    def _start_timer(self, delay: float, event: I) -> None:
        self._timer = self._clock.callLater(delay, self._timer_fired, event)

    def _timer_fired(self, event: I) -> None:
        self._timer = None
        self._fire(event)

    def _cancel_timer(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()

    @property
    def timer_running(self) -> bool:
        """Whether the current state's timer is set (for tests)."""
        return self._timer is not None
