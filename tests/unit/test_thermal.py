"""ThermalGovernor: back-off, hard stop, hysteresis and unknown readings."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemon.thermal import ThermalDecision, ThermalGovernor

SOFT_C, HARD_C, RESUME_C = 75.0, 82.0, 70.0


def governor(max_threads: int = 4) -> ThermalGovernor:
    return ThermalGovernor(
        soft_limit_c=SOFT_C, hard_limit_c=HARD_C, resume_below_c=RESUME_C, max_threads=max_threads
    )


def run(
    gov: ThermalGovernor, readings: list[float | None], throttled_now: bool | None = False
) -> list[ThermalDecision]:
    return [gov.update(cpu_c, throttled_now) for cpu_c in readings]


@pytest.mark.parametrize(
    ("soft", "hard", "resume", "threads"),
    [
        (82.0, 82.0, 70.0, 4),
        (85.0, 82.0, 70.0, 4),
        (75.0, 82.0, 75.0, 4),
        (75.0, 82.0, 80.0, 4),
        (75.0, 82.0, 70.0, 0),
    ],
)
def test_constructor_rejects_inconsistent_limits(
    soft: float, hard: float, resume: float, threads: int
) -> None:
    with pytest.raises(ValueError, match="must be"):
        ThermalGovernor(soft, hard, resume, threads)


def test_cool_kiosk_runs_at_full_speed_and_reports_no_change() -> None:
    decisions = run(governor(), [45.0, 60.0, 69.9])

    assert [d.threads for d in decisions] == [4, 4, 4]
    assert not any(d.changed or d.overheated or d.throttled for d in decisions)


def test_soft_limit_steps_down_one_thread_per_reading_to_one() -> None:
    decisions = run(governor(), [76.0] * 5)

    assert [d.threads for d in decisions] == [3, 2, 1, 1, 1]
    assert [d.changed for d in decisions] == [True, True, True, False, False]
    assert all(d.throttled and not d.overheated for d in decisions)
    assert "soft limit" in decisions[0].reason
    assert "76.0" in decisions[0].reason


def test_reaching_the_soft_limit_exactly_backs_off() -> None:
    assert governor().update(SOFT_C, False).threads == 3


def test_hard_limit_pauses_generation_at_once() -> None:
    decision = governor().update(82.5, False)

    assert decision.overheated
    assert decision.throttled
    assert decision.changed
    assert decision.threads == 3
    assert "hard limit" in decision.reason


def test_cooling_restores_threads_step_by_step_with_hysteresis() -> None:
    gov = governor()
    run(gov, [83.0, 83.0, 83.0])
    assert (gov.threads, gov.overheated) == (1, True)

    # Below hard but at or above soft: still backing off, and still overheated.
    band_high = run(gov, [80.0, 76.0])
    assert [(d.threads, d.overheated) for d in band_high] == [(1, True), (1, True)]

    # The hysteresis band: below soft but not below resume holds everything.
    band = run(gov, [74.0, 72.0, 70.0])
    assert [(d.threads, d.overheated, d.changed) for d in band] == [(1, True, False)] * 3
    assert "holding" in band[0].reason

    cooling = run(gov, [69.0, 68.0, 67.0, 66.0, 65.0])
    assert [d.threads for d in cooling] == [2, 3, 4, 4, 4]
    assert [d.overheated for d in cooling] == [False] * 5
    assert [d.changed for d in cooling] == [True, True, True, False, False]
    assert [d.throttled for d in cooling] == [True, True, False, False, False]


def test_warming_in_the_band_after_a_partial_recovery_holds() -> None:
    gov = governor()
    run(gov, [76.0, 76.0, 76.0, 60.0])
    assert gov.threads == 2

    decisions = run(gov, [72.0, 73.0, 74.9])

    assert [d.threads for d in decisions] == [2, 2, 2]


def test_unknown_temperature_never_starts_a_back_off() -> None:
    decisions = run(governor(), [None, None, math.nan])

    assert all(d.threads == 4 and not d.overheated and not d.changed for d in decisions)
    assert "unknown" in decisions[0].reason


def test_unknown_temperature_never_clears_overheated_or_restores_threads() -> None:
    gov = governor()
    run(gov, [85.0, 85.0])

    decisions = run(gov, [None] * 5)

    assert all(d.overheated and d.threads == 2 and not d.changed for d in decisions)
    assert "below 70" in decisions[0].reason
    # Only a real reading below resume_below_c resumes.
    assert not gov.update(69.5, None).overheated


def test_firmware_throttling_backs_off_even_without_a_temperature() -> None:
    decisions = run(governor(), [None, None], throttled_now=True)

    assert [d.threads for d in decisions] == [3, 2]
    assert not any(d.overheated for d in decisions)
    assert "firmware" in decisions[0].reason


def test_firmware_throttling_blocks_stepping_up_but_not_clearing_overheated() -> None:
    gov = governor()
    run(gov, [83.0])

    decision = gov.update(60.0, True)

    # Under-voltage is not heat: a cool reading clears the pause, but threads stay down.
    assert not decision.overheated
    assert decision.threads == 2
    assert gov.update(60.0, False).threads == 3


def test_not_a_pi_is_not_throttling() -> None:
    assert run(governor(), [50.0, 50.0], throttled_now=None)[-1].threads == 4


def test_single_thread_kiosk_can_still_overheat() -> None:
    gov = governor(max_threads=1)

    warm = gov.update(78.0, False)
    # Nothing left to shed: at one thread the soft limit changes nothing.
    assert (warm.threads, warm.overheated, warm.throttled, warm.changed) == (1, False, False, False)
    hot = gov.update(90.0, False)
    assert (hot.threads, hot.overheated, hot.throttled, hot.changed) == (1, True, True, True)


@given(
    max_threads=st.integers(min_value=1, max_value=8),
    readings=st.lists(
        st.tuples(
            st.one_of(st.none(), st.floats(min_value=20.0, max_value=100.0)),
            st.one_of(st.none(), st.booleans()),
        ),
        max_size=40,
    ),
)
def test_invariants_hold_for_any_sequence(
    max_threads: int, readings: list[tuple[float | None, bool | None]]
) -> None:
    gov = governor(max_threads)
    previous_threads, previous_overheated = max_threads, False
    for cpu_c, throttled_now in readings:
        decision = gov.update(cpu_c, throttled_now)
        assert 1 <= decision.threads <= max_threads
        assert abs(decision.threads - previous_threads) <= 1
        assert decision.throttled == (decision.overheated or decision.threads < max_threads)
        assert decision.changed == (
            (decision.threads, decision.overheated) != (previous_threads, previous_overheated)
        )
        if decision.overheated and not previous_overheated:
            assert cpu_c is not None
            assert cpu_c >= HARD_C
        if previous_overheated and not decision.overheated:
            assert cpu_c is not None
            assert cpu_c < RESUME_C
        if decision.threads > previous_threads:
            assert cpu_c is not None
            assert cpu_c < RESUME_C
            assert throttled_now is not True
        previous_threads, previous_overheated = decision.threads, decision.overheated
