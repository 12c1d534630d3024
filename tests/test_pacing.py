"""Tests of the per-user and per-project call pacer, on a fake clock."""

from __future__ import annotations

import bisect
import random
import threading
import time

import pytest

from connector import pacing
from connector.pacing import Pacer, PacingTimeoutError


class FakeClock:
    """A clock that moves only when the code under test sleeps or a test advances it."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_pacer(clock: FakeClock, per_user: float = 60, per_project: float = 600) -> Pacer:
    return Pacer(per_user, per_project, clock=clock, sleep=clock.sleep)


def test_first_call_does_not_wait() -> None:
    clock = FakeClock()
    pacer = make_pacer(clock)

    assert pacer.acquire("ana@example.com") == 0
    assert clock.sleeps == []


def test_user_calls_are_evenly_spaced() -> None:
    clock = FakeClock()
    pacer = make_pacer(clock, per_user=60)

    waits = [pacer.acquire("ana@example.com") for _ in range(4)]

    assert waits == [0, 1.0, 1.0, 1.0]


def test_users_are_paced_independently() -> None:
    clock = FakeClock()
    pacer = make_pacer(clock, per_user=60, per_project=6000)

    pacer.acquire("ana@example.com")
    wait_for_other_user = pacer.acquire("ben@example.com")
    wait_for_same_user = pacer.acquire("ana@example.com")

    assert wait_for_other_user == 0
    assert wait_for_same_user == pytest.approx(1.0)


def test_project_rate_limits_all_users() -> None:
    clock = FakeClock()
    pacer = make_pacer(clock, per_user=60, per_project=120)

    waits = [pacer.acquire(f"user{index}@example.com") for index in range(4)]

    assert waits == [0, 0.5, 0.5, 0.5]


def test_busy_user_does_not_hold_back_others() -> None:
    clock = FakeClock()
    # The clock does not move, as if three threads made ana's three calls at once.
    pacer = Pacer(60, 6000, clock=clock, sleep=lambda seconds: None)

    ana_waits = [pacer.acquire("ana@example.com") for _ in range(3)]
    ben_wait = pacer.acquire("ben@example.com")

    # The project's slots are caught up on, so ben's call and cy's take slots that passed.
    assert [round(wait, 2) for wait in ana_waits] == [0, 1.0, 2.0]
    assert ben_wait == 0
    assert pacer.delay("cy@example.com") == 0
    assert pacer.user_delay("cy@example.com") == 0
    assert pacer.user_delay("ana@example.com") == pytest.approx(3.0)
    assert pacer.user_delay("ana@example.com", calls_ahead=2) == pytest.approx(5.0)


def test_idle_time_gives_no_burst() -> None:
    clock = FakeClock()
    pacer = make_pacer(clock, per_user=60)

    pacer.acquire("ana@example.com")
    clock.advance(600)
    first_after_idle = pacer.acquire("ana@example.com")
    second_after_idle = pacer.acquire("ana@example.com")

    assert first_after_idle == 0
    assert second_after_idle == 1.0


def test_slow_down_delays_only_that_user() -> None:
    clock = FakeClock()
    pacer = make_pacer(clock, per_user=60, per_project=6000)

    pacer.slow_down("ana@example.com", 5)
    other_wait = pacer.acquire("ben@example.com")
    slowed_wait = pacer.acquire("ana@example.com")

    assert other_wait == 0
    assert slowed_wait == pytest.approx(5.0)


def test_slow_down_never_shortens_a_pause() -> None:
    clock = FakeClock()
    pacer = make_pacer(clock)

    pacer.slow_down("ana@example.com", 10)
    pacer.slow_down("ana@example.com", 2)

    assert pacer.delay("ana@example.com") == pytest.approx(10.0)


def test_slow_down_ignores_non_positive_seconds() -> None:
    clock = FakeClock()
    pacer = make_pacer(clock)

    pacer.slow_down("ana@example.com", 0)
    pacer.slow_down("ana@example.com", -3)

    assert pacer.delay("ana@example.com") == 0


def test_timeout_raises_and_reserves_nothing() -> None:
    clock = FakeClock()
    pacer = make_pacer(clock)
    pacer.slow_down("ana@example.com", 100)

    with pytest.raises(PacingTimeoutError) as caught:
        pacer.acquire("ana@example.com", timeout=30)

    assert caught.value.wait_seconds == pytest.approx(100.0)
    assert caught.value.user == "ana@example.com"
    assert "ana@example.com" in str(caught.value)
    assert clock.sleeps == []
    assert pacer.delay("ana@example.com") == pytest.approx(100.0)


def test_timeout_allows_shorter_waits() -> None:
    clock = FakeClock()
    pacer = make_pacer(clock, per_user=60)

    pacer.acquire("ana@example.com")
    wait = pacer.acquire("ana@example.com", timeout=5)

    assert wait == 1.0


def test_delay_reserves_nothing() -> None:
    clock = FakeClock()
    pacer = make_pacer(clock, per_user=60)
    pacer.acquire("ana@example.com")

    assert pacer.delay("ana@example.com") == 1.0
    assert pacer.delay("ana@example.com") == 1.0


@pytest.mark.parametrize("per_user, per_project", [(0, 100), (-1, 100), (100, 0)])
def test_non_positive_rates_are_rejected(per_user: float, per_project: float) -> None:
    with pytest.raises(ValueError):
        Pacer(per_user, per_project)


def test_threads_get_distinct_slots() -> None:
    clock = FakeClock()
    waits: list[float] = []
    waits_lock = threading.Lock()
    # The clock stands still, so every thread reserves a slot at a distinct offset. The
    # project's rate is high enough that its waits stay below half a second in total.
    pacer = Pacer(60, 600_000, clock=clock, sleep=lambda seconds: None)

    def worker() -> None:
        for _ in range(5):
            wait = pacer.acquire("ana@example.com")
            with waits_lock:
                waits.append(wait)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(round(wait) for wait in waits) == list(range(40))


def test_idle_users_are_pruned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pacing, "PRUNE_THRESHOLD", 10)
    clock = FakeClock()
    pacer = make_pacer(clock, per_user=60, per_project=60000)

    for index in range(50):
        pacer.acquire(f"user{index}@example.com")
        clock.advance(2)

    assert len(pacer._users) <= 10


def test_pruning_keeps_paused_users(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pacing, "PRUNE_THRESHOLD", 10)
    clock = FakeClock()
    pacer = make_pacer(clock, per_user=60, per_project=60000)
    pacer.slow_down("paused@example.com", 1000)

    for index in range(50):
        pacer.acquire(f"user{index}@example.com")
        clock.advance(2)

    assert pacer.delay("paused@example.com") > 800


def test_real_clock_spaces_calls() -> None:
    pacer = Pacer(per_user_per_minute=6000, per_project_per_minute=60000)

    started = time.monotonic()
    for _ in range(11):
        pacer.acquire("ana@example.com")
    elapsed = time.monotonic() - started

    # Ten intervals of 10 ms each.
    assert elapsed >= 0.095


def test_project_slot_missed_briefly_is_caught_up() -> None:
    clock = FakeClock()
    # 6,000 calls a minute: 10 slots may be caught up on, and slots are 60 / 5,989 s apart.
    pacer = make_pacer(clock, per_user=6000, per_project=6000)
    interval = 60 / (6000 - 11)
    for index in range(20):  # more back-to-back calls than the tolerance covers
        pacer.acquire(f"user{index}@example.com")

    clock.advance(3 * interval)  # no caller was ready for three slots
    waits = [pacer.acquire(f"late{index}@example.com") for index in range(4)]

    assert waits[:3] == [0, 0, 0]
    assert waits[3] == pytest.approx(interval)


def test_project_catch_up_is_bounded_after_idle_time() -> None:
    clock = FakeClock()
    pacer = make_pacer(clock, per_user=60, per_project=6000)
    interval = 60 / (6000 - 11)

    pacer.acquire("user0@example.com")
    clock.advance(600)
    waits = [pacer.acquire(f"user{index}@example.com") for index in range(1, 14)]

    # The 10 slots that may be caught up on and the current one go at once. Later calls are spaced.
    assert waits[:11] == [0] * 11
    assert waits[11:] == [pytest.approx(interval)] * 2


def test_busiest_minute_within_project_quota() -> None:
    clock = FakeClock()
    pacer = make_pacer(clock, per_user=6000, per_project=6000)
    randomness = random.Random(7)
    calls: list[float] = []

    # Bursts of callers with short idle gaps between them: the pattern that catching up rewards.
    while clock.now < 1000 + 180:
        for _ in range(randomness.randint(1, 30)):
            pacer.acquire(f"user{randomness.randrange(50)}@example.com")
            calls.append(clock.now)
        clock.advance(randomness.uniform(0, 0.1))
    # Then an idle second, which frees every slot that may be caught up on, and a full minute
    # of callers ready back to back: the busiest minute a pacer allows.
    clock.advance(1)
    for index in range(7000):
        pacer.acquire(f"user{index % 50}@example.com")
        calls.append(clock.now)

    busiest = max(bisect.bisect_left(calls, start + 60) - index for index, start in enumerate(calls))
    assert busiest <= 6000
    assert busiest > 5900  # the run does use the quota, so the bound above is tested
