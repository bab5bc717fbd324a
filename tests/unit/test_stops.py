"""The answer text filter (daemon/stops.py): leading white space, stop strings, hold-back."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from daemon.stops import AnswerText


def _run(stops: list[str], pieces: list[str]) -> tuple[AnswerText, list[str]]:
    published: list[str] = []
    answer = AnswerText(stops, published.append)
    for piece in pieces:
        if answer.add(piece):
            break
    answer.finish()
    return answer, published


def test_a_stop_split_across_pieces_is_never_published() -> None:
    answer, published = _run(["END"], ["The valve is ", "open.", " E", "N", "D more"])
    assert answer.stopped
    assert answer.text == "The valve is open. "
    assert published == ["The valve is ", "open.", " "]


def test_held_text_goes_out_as_soon_as_it_cannot_become_a_stop() -> None:
    published: list[str] = []
    answer = AnswerText(["\n\nQuestion:"], published.append)
    answer.add("Yes.\n")
    assert published == ["Yes."]
    answer.add("\nQ")
    assert published == ["Yes."]
    answer.add("uiz")  # "\n\nQuiz" can no longer become "\n\nQuestion:"
    assert published == ["Yes.", "\n\nQuiz"]
    assert not answer.stopped


def test_held_text_is_published_when_the_answer_ends_otherwise() -> None:
    answer, published = _run(["STOP"], ["Check the oil. ST"])
    assert not answer.stopped
    assert published == ["Check the oil. ", "ST"]
    assert answer.text == "Check the oil. ST"


def test_leading_white_space_is_not_part_of_the_answer() -> None:
    answer, published = _run(["\n\n"], [" ", "\n", "  Press", " the button.", "\n\n", "More"])
    assert answer.text == "Press the button."
    assert published[0] == "Press"


def test_an_answer_that_starts_with_a_stop_is_empty() -> None:
    answer, published = _run(["Question:"], [" Question: what?"])
    assert answer.stopped
    assert answer.text == ""
    assert published == []


def test_the_earliest_of_several_stops_wins() -> None:
    answer, _ = _run(["cd", "bcx", "b"], ["abcdef"])
    assert answer.text == "a"


_TEXT = st.text(alphabet="ab \nQ:", max_size=12)


@given(
    stops=st.lists(st.text(alphabet="ab \nQ:", min_size=1, max_size=4), max_size=3),
    pieces=st.lists(_TEXT, max_size=12),
)
def test_chunks_join_to_the_text_cut_before_the_first_stop(
    stops: list[str], pieces: list[str]
) -> None:
    published: list[str] = []
    answer = AnswerText(stops, published.append)
    seen = ""
    for piece in pieces:
        seen += piece
        if answer.add(piece):
            break
        shown = "".join(published)
        held = seen.lstrip()[len(shown) :]
        # Only a tail that a stop string starts with is held back, and nothing else.
        assert seen.lstrip().startswith(shown)
        assert not held or any(stop.startswith(held) for stop in stops)
    answer.finish()
    expected = seen.lstrip()
    cuts = [expected.find(stop) for stop in stops if stop in expected]
    if cuts:
        expected = expected[: min(cuts)]
    assert answer.text == expected == "".join(published)
    assert all(published)  # no empty chunk
