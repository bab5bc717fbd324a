"""Property tests of the request parser, and a generated burst against the real daemon.

The parser's contract (docs/protocol.md, "Asking a question"): whatever arrives on `P/ask`,
parse_request either returns a Request that obeys every rule, or raises RequestError with one
of the protocol's codes; no other exception ever escapes to the network thread. Examples are
derandomized, so CI runs the same ones every time.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from daemon.messages import ErrorCode, Request, RequestError
from daemon.validation import parse_cancel, parse_request
from tests.e2e.test_chaos import Streams
from tests.support.daemon import DaemonFactory
from tests.support.mqtt_client import Received, TestClient, assert_well_formed

# The rules, written out here from docs/protocol.md rather than imported from the code under test.
ID_RULE = re.compile(r"[A-Za-z0-9._-]{1,64}")
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0 but \t \n \r, DEL, C1
MAX_DEPTH = 32
REQUEST_CODES = {
    ErrorCode.INVALID_JSON,
    ErrorCode.INVALID_REQUEST,
    ErrorCode.BAD_ENCODING,
    ErrorCode.TOO_LARGE,
}

PROPERTY = settings(max_examples=2000, deadline=None, derandomize=True, database=None)

# --- strategies -----------------------------------------------------------------------------

SPECIAL_CHARACTERS = [
    *'\x00\t\n\r\x1b\x7f\x85\x9b\x9f\xa0\u2028\ufeff/+#$"\\{}[] ',
    "\ud800",
    "\udfff",
    "\U0001f600",
    "é",
]
MARKERS = ["<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<bos>", "[INST]"]
characters = st.one_of(st.characters(), st.sampled_from(SPECIAL_CHARACTERS))
texts = st.one_of(
    st.text(characters, max_size=30),
    st.lists(st.sampled_from([*MARKERS, "system", "hi", " ", "\n"]), max_size=6).map("".join),
    st.text(st.sampled_from(" \tq\n"), max_size=70),  # around the question length limits
)
valid_ids = st.from_regex(ID_RULE, fullmatch=True)
numbers = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**600), max_value=10**600),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2, -0.0, 5e-324, 2.0000000001, 1e308]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=8,
)
# Mostly well-formed values, so that accepted requests are common too, plus anything at all.
questions = st.text(st.characters(codec="utf-8", exclude_categories=["C"]), min_size=1, max_size=40)
request_fields = st.fixed_dictionaries(
    {"question": st.one_of(questions, questions, texts, json_values)},
    optional={
        "id": st.one_of(valid_ids, valid_ids, json_values),
        "max_tokens": st.one_of(
            st.integers(min_value=1, max_value=10**6), st.integers(max_value=0), json_values
        ),
        "temperature": st.one_of(
            st.floats(min_value=0, max_value=2), st.floats(min_value=-1, max_value=3), json_values
        ),
        "deadline_s": st.one_of(
            st.floats(min_value=1e-3, max_value=1e6), st.floats(max_value=0), json_values
        ),
    },
)
json_objects = st.tuples(request_fields, st.dictionaries(texts, json_values, max_size=2)).map(
    lambda parts: {**parts[1], **parts[0]}
)
STYLES = ("ascii", "utf-8", "pretty", "nested", "duplicate")


Encoded = tuple[dict[str, Any], dict[str, Any], bytes, str]


@st.composite
def encoded_objects(draw: st.DrawFn) -> Encoded:
    """A JSON object as a device might send it: (fields, the object sent, payload, style)."""
    fields = draw(json_objects)
    if draw(st.sampled_from(["keep"] * 9 + ["drop"])) == "drop":  # favours the first: keep
        del fields["question"]
    style = draw(st.sampled_from(STYLES))
    nesting = draw(st.integers(min_value=0, max_value=40)) if style == "nested" else 0
    body = dict(fields)
    if nesting:
        body["deep"] = json.loads("[" * nesting + "]" * nesting)
    text = json.dumps(
        body, ensure_ascii=style == "ascii", allow_nan=True, indent=2 if style == "pretty" else None
    )
    if style == "duplicate" and fields:
        first = json.dumps(next(iter(fields)), ensure_ascii=False)
        text = "{" + first + ": null, " + text[1:]
    lead = draw(st.sampled_from(["", " ", "\n\t ", "\r\n"]))
    # Lone surrogates become bytes no UTF-8 decoder accepts, as a broken encoder would send.
    return fields, body, (lead + text).encode("utf-8", "surrogatepass"), style


JSON_TOKENS = [
    *'{}[]":,\\ ',
    '\\"',
    '"id"',
    '"question"',
    '"max_tokens"',
    '"temperature"',
    '"deadline_s"',
    '"ok-1"',
    '"why?"',
    "1",
    "-0.0",
    "1e999",
    "5e-324",
    "NaN",
    "-Infinity",
    "true",
    "null",
    "9" * 4400,
    "\\ud800",
    "\\u0000",
    "<|im_start|>",
]
token_soup = st.lists(st.sampled_from(JSON_TOKENS), max_size=40).map(
    lambda tokens: "".join(tokens).encode("utf-8")
)
raw_payloads = st.one_of(
    st.binary(max_size=200),
    token_soup,
    st.text(characters, max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
    encoded_objects().map(lambda encoded: encoded[2]),
)
limits = st.fixed_dictionaries(
    {
        # Hypothesis favours the first choice: the defaults come first.
        "max_payload_bytes": st.sampled_from([65536, 300, 64]),
        "max_question_chars": st.sampled_from([2000, 50, 5, 1]),
    }
)

# --- the checks -----------------------------------------------------------------------------


def parse_checked(
    payload: bytes, max_payload_bytes: int, max_question_chars: int
) -> Request | RequestError:
    """parse_request, with every rule of docs/protocol.md checked on whatever comes out.

    Returns the Request, or the RequestError that refused the payload; any other exception
    fails the test.
    """
    try:
        request = parse_request(
            payload, max_payload_bytes=max_payload_bytes, max_question_chars=max_question_chars
        )
    except RequestError as exc:
        error = exc
    else:
        _check_request(request, payload, max_payload_bytes, max_question_chars)
        return request
    assert type(error) is RequestError
    assert error.code in REQUEST_CODES, error.code
    assert isinstance(error.message, str)
    assert error.message
    assert error.request_id is None or ID_RULE.fullmatch(error.request_id)
    if len(payload) > max_payload_bytes:
        assert error.code is ErrorCode.TOO_LARGE
        assert error.request_id is None, "a too large payload is not read"
    else:
        assert error.code is not ErrorCode.TOO_LARGE
        if not _is_utf8(payload):
            assert (error.code, error.request_id) == (ErrorCode.BAD_ENCODING, None)
    return error


def _check_request(
    request: Request, payload: bytes, max_payload_bytes: int, max_question_chars: int
) -> None:
    assert len(payload) <= max_payload_bytes
    assert _is_utf8(payload)
    assert isinstance(request.id, str)
    assert ID_RULE.fullmatch(request.id)
    question = request.question
    assert isinstance(question, str)
    assert question
    assert question == question.strip()
    assert len(question) <= max_question_chars
    question.encode("utf-8")  # no lone surrogates
    assert not CONTROL.search(question)
    if request.max_tokens is not None:
        assert type(request.max_tokens) is int
        assert request.max_tokens >= 1
    if request.temperature is not None:
        assert type(request.temperature) is float
        assert 0 <= request.temperature <= 2
    if request.deadline_s is not None:
        assert type(request.deadline_s) is float
        assert math.isfinite(request.deadline_s)
        assert request.deadline_s > 0


def _is_utf8(payload: bytes) -> bool:
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max(map(_depth, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(_depth, value), default=0)
    return 0


def _optional_number(value: Any, in_range: Any) -> tuple[bool, float | None]:
    if value is None:
        return True, None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False, None
    try:
        number = float(value)
    except OverflowError:
        return False, None
    return math.isfinite(number) and in_range(number), number


def expected_request(fields: dict[str, Any], max_question_chars: int) -> Request | None:
    """The Request that docs/protocol.md says `fields` make, or None when a rule is broken."""
    request_id = fields.get("id")
    if request_id is not None and not (
        isinstance(request_id, str) and ID_RULE.fullmatch(request_id)
    ):
        return None
    question = fields.get("question")
    if not isinstance(question, str):
        return None
    question = question.strip()
    if not question or len(question) > max_question_chars or CONTROL.search(question):
        return None
    if any(0xD800 <= ord(c) <= 0xDFFF for c in question):
        return None
    max_tokens = fields.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        return None
    temperature_ok, temperature = _optional_number(fields.get("temperature"), lambda t: 0 <= t <= 2)
    deadline_ok, deadline_s = _optional_number(fields.get("deadline_s"), lambda d: d > 0)
    if not (temperature_ok and deadline_ok):
        return None
    return Request(request_id or "", question, max_tokens, temperature, deadline_s)


# --- properties of the parser ----------------------------------------------------------------


@PROPERTY
@given(payload=raw_payloads, limit=limits)
def test_any_bytes_give_a_valid_request_or_a_protocol_error(
    payload: bytes, limit: dict[str, int]
) -> None:
    outcome = parse_checked(payload, **limit)
    event(f"outcome: {outcome.code if isinstance(outcome, RequestError) else 'request'}")


@PROPERTY
@given(encoded=encoded_objects(), limit=limits)
def test_json_objects_are_read_by_the_rules(encoded: Encoded, limit: dict[str, int]) -> None:
    fields, body, payload, style = encoded
    outcome = parse_checked(payload, **limit)
    error = outcome if isinstance(outcome, RequestError) else None
    event(f"{style}: {error.code if error else 'request'}")
    if len(payload) > limit["max_payload_bytes"] or not _is_utf8(payload):
        return  # the code was checked in parse_checked
    if (style == "duplicate" and fields) or _depth(body) > MAX_DEPTH:
        assert error is not None, "duplicate keys and deep nesting are refused"
        assert (error.code, error.request_id) == (ErrorCode.INVALID_JSON, None)
        return
    expected = expected_request(fields, limit["max_question_chars"])
    client_id = fields.get("id")
    if expected is None:
        assert error is not None, f"accepted although a rule is broken: {outcome}"
        assert error.code in (ErrorCode.INVALID_REQUEST, ErrorCode.BAD_ENCODING)
        if isinstance(client_id, str) and ID_RULE.fullmatch(client_id):
            assert error.request_id == client_id, "an error for a readable id goes to its stream"
        elif client_id is not None:
            assert (error.code, error.request_id) == (ErrorCode.INVALID_REQUEST, None)
        return
    assert isinstance(outcome, Request), f"refused a valid request: {outcome.message}"
    if client_id is None:
        assert re.fullmatch(r"[0-9a-f]{12}", outcome.id), "generated ids are 12 hex characters"
        expected = Request(outcome.id, *_rest(expected), id_chosen=False)
    assert outcome == expected


def _rest(request: Request) -> tuple[Any, ...]:
    return (request.question, request.max_tokens, request.temperature, request.deadline_s)


@PROPERTY
@given(
    payload=st.one_of(
        raw_payloads,
        st.tuples(st.one_of(valid_ids, json_values), st.booleans()).map(
            lambda t: json.dumps({"id": t[0]}, ensure_ascii=t[1]).encode("utf-8", "surrogatepass")
        ),
    )
)
def test_cancel_payloads_give_a_valid_id_or_none(payload: bytes) -> None:
    request_id = parse_cancel(payload)
    event("an id" if request_id else "none")
    assert request_id is None or (isinstance(request_id, str) and ID_RULE.fullmatch(request_id))
    try:
        fields = json.loads(payload)
    except (ValueError, RecursionError):
        return
    if isinstance(fields, dict) and isinstance(fields.get("id"), str):
        wanted = fields["id"] if ID_RULE.fullmatch(fields["id"]) else None
        if len(payload) <= 256:  # a cancel is about 80 bytes; the daemon may refuse big ones
            assert request_id == wanted
        else:
            assert request_id in (wanted, None)


def test_parse_time_is_linear_in_the_payload() -> None:
    payload = b"{" + b'\\"' * 12000  # 24 KB: parsed in ~2 s on a 2-core VM, should be ~1 ms
    started = time.perf_counter()
    outcome = parse_checked(payload, max_payload_bytes=65536, max_question_chars=2000)
    elapsed_s = time.perf_counter() - started
    assert isinstance(outcome, RequestError)
    assert outcome.code is ErrorCode.INVALID_JSON
    assert elapsed_s < 0.2, f"{elapsed_s:.2f} s for {len(payload)} bytes"


# --- a generated burst against the real daemon -----------------------------------------------

DAEMON_LIMITS = {"max_payload_bytes": 2048, "max_question_chars": 300}


def _client_id(payload: bytes) -> str | None:
    """The id a payload carries itself, if it is a JSON object with a valid one."""
    try:
        fields = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    request_id = fields.get("id") if isinstance(fields, dict) else None
    return request_id if isinstance(request_id, str) and ID_RULE.fullmatch(request_id) else None


class _Burst:
    """Where a burst's terminal messages must show up, from the parser's own verdicts."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.on_error = 0
        self.named: set[str] = set()
        self.generated = 0

    def add(self, payload: bytes) -> None:
        try:
            parse_request(payload, **DAEMON_LIMITS)
            attributed = True
        except RequestError as exc:
            attributed = exc.code is not ErrorCode.TOO_LARGE and exc.request_id is not None
        client_id = _client_id(payload) if attributed else None
        if client_id in self.named:
            return  # one request per id, so each stream has exactly one terminal
        self.payloads.append(payload)
        if not attributed:
            self.on_error += 1
        elif client_id is None:
            self.generated += 1
        else:
            self.named.add(client_id)


def test_generated_bursts_against_the_daemon(
    start_daemon: DaemonFactory, client: TestClient
) -> None:
    daemon = start_daemon(
        {"limits": DAEMON_LIMITS, "model": {"max_tokens": 1}, "queue": {"capacity": 100}}
    )
    client.subscribe(daemon.topic("error"))
    client.subscribe(daemon.topic("answer/+"))
    bursts: list[int] = []

    @settings(
        max_examples=4,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],  # no shrinking: every step would be another burst
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(payloads=st.lists(raw_payloads, min_size=20, max_size=30))
    def burst_is_survived(payloads: list[bytes]) -> None:
        burst = _Burst()
        for payload in payloads:
            burst.add(payload)
        start = len(client.received)
        for payload in burst.payloads:
            client.publish(daemon.topic("ask"), payload)
        streams = Streams(daemon.prefix, start=start)
        error_topic = daemon.topic("error")
        named = {daemon.topic(f"answer/{rid}") for rid in burst.named}

        def ended(got: list[Received]) -> bool:
            streams.update(got)
            others = [t for t in streams.answer_topics() if t not in named]
            return (
                streams.terminals(error_topic) >= burst.on_error
                and all(streams.terminals(t) for t in named)
                and len(others) >= burst.generated
                and all(streams.terminals(t) for t in others)
            )

        client.wait_for(ended, timeout_s=60)
        time.sleep(0.3)
        streams.update(client.received)
        for item in client.received[start:]:
            message = json.loads(item.payload)
            assert isinstance(message, dict)
            assert {"id", "seq", "type"} <= message.keys()
            assert message["type"] in ("queued", "chunk", "done", "error")
            assert isinstance(message["seq"], int)
        errors = streams.by_topic.get(error_topic, [])
        assert len(errors) == burst.on_error
        assert all(m["type"] == "error" and m["seq"] == 0 for m in errors)
        for topic in streams.answer_topics():
            messages = streams.by_topic[topic]
            assert_well_formed(messages, topic.rsplit("/", 1)[1])
        assert len(streams.answer_topics()) == len(named) + burst.generated

        after = f"after-{len(bursts)}"
        client.publish(daemon.topic("ask"), {"id": after, "question": "Hi.", "max_tokens": 1})
        messages = client.stream(daemon.topic(f"answer/{after}"))
        assert assert_well_formed(messages, after)["type"] == "done"
        bursts.append(len(burst.payloads))
        event(f"answered (generated id): {burst.generated}")
        event(f"on P/error: {burst.on_error}")

    burst_is_survived()
    print(f"generated bursts of {bursts} payloads, all survived")
    assert sum(bursts) >= 50
    assert daemon.process.poll() is None, daemon.log()
