"""The mesh's desired state (``meshd.mesh.desired``): the merge rule -- (version, node id),
last writer wins -- is commutative, associative and idempotent; bodies from peers and the
state file are validated; desired.json is written atomically and a broken one stops the
start with one line naming it."""

from __future__ import annotations

import itertools
import json
import os
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.mesh import desired
from meshd.mesh.desired import MAX_DECISIONS, Decision, DesiredState, Want, merge
from meshd.statedir import StateDir, StateDirError


def d(model: str, want: Want, version: int, by: str, at: float = 0.0) -> Decision:
    return Decision(model, want, version, by, at)


DROP, SERVE = Want.DROPPED, Want.SERVE


# -- the merge rule -----------------------------------------------------------------------------


def test_the_higher_version_wins_whoever_wrote_it():
    s = DesiredState([d("m", DROP, 3, "node-z")])
    assert s.merge([d("m", SERVE, 4, "node-a")]) == [d("m", SERVE, 4, "node-a")]
    assert s.merge([d("m", DROP, 3, "node-z")]) == []  # older: not taken
    assert s.get("m") == d("m", SERVE, 4, "node-a") and s.dropped == frozenset()


def test_equal_versions_from_both_sides_of_a_partition_go_to_the_higher_node_id():
    a_side = DesiredState([d("m", DROP, 1, "node-a")])
    b_side = DesiredState([d("m", SERVE, 1, "node-b")])
    assert merge(a_side, b_side) == merge(b_side, a_side)
    assert merge(a_side, b_side).get("m") == d("m", SERVE, 1, "node-b")
    a_side.merge(b_side.decisions.values())
    b_side.merge(a_side.decisions.values())
    assert a_side == b_side  # both sides hold the same state after the heal


def test_a_node_that_decides_takes_the_next_version_of_what_it_holds():
    s = DesiredState([d("m", DROP, 7, "node-b")])
    serve = s.decide("m", SERVE, by="node-a", at=10.0)
    assert serve == d("m", SERVE, 8, "node-a", 10.0)
    assert s.decide("other", DROP, by="node-a").version == 1
    # what the other side held loses to it, though its node id is higher
    assert not DesiredState([serve]).merge([d("m", DROP, 7, "node-z")])


def test_merging_twice_changes_nothing_the_second_time():
    s = DesiredState()
    batch = [d("m", DROP, 2, "a"), d("k", SERVE, 1, "b")]
    assert len(s.merge(batch)) == 2
    assert s.merge(batch) == []


def test_one_batch_with_two_decisions_for_a_model_takes_the_winner():
    s = DesiredState()
    assert s.merge([d("m", DROP, 2, "b"), d("m", SERVE, 3, "a"), d("m", DROP, 1, "z")]) == [
        d("m", SERVE, 3, "a")
    ]


decisions = st.builds(
    Decision,
    model=st.sampled_from(["m1", "m2", "m3"]),
    want=st.sampled_from(list(Want)),
    version=st.integers(1, 4),
    by=st.sampled_from(["node-a", "node-b", "node-c"]),
    at=st.sampled_from([0.0, 1.0]),
)
states = st.lists(decisions, max_size=8).map(DesiredState)


@settings(max_examples=300, deadline=None)
@given(states, states, states)
def test_merge_is_commutative_associative_and_idempotent(a, b, c):
    assert merge(a, b) == merge(b, a)
    assert merge(merge(a, b), c) == merge(a, merge(b, c))
    assert merge(a, a) == a
    assert merge(merge(a, b), b) == merge(a, b)


@settings(max_examples=100, deadline=None)
@given(st.lists(decisions, max_size=10))
def test_every_order_of_hearing_the_same_decisions_ends_in_the_same_state(heard):
    results = set()
    for order in itertools.islice(itertools.permutations(heard), 24):
        s = DesiredState()
        for one in order:
            s.merge([one])
        results.add(json.dumps(s.to_body(), sort_keys=True))
    assert len(results) <= 1


def test_the_number_of_models_is_bounded():
    s = DesiredState([d(f"m{i}", DROP, 1, "a") for i in range(MAX_DECISIONS)])
    assert s.merge([d("one-more", DROP, 1, "a")]) == []
    assert s.merge([d("m0", SERVE, 2, "a")])  # a model it holds still changes
    with pytest.raises(ValueError, match=f"{MAX_DECISIONS}"):
        s.decide("one-more", DROP, by="a")


# -- a DROP frame as a decision (peers older than DESIRED) ------------------------------------


def test_a_drop_with_a_version_is_that_decision():
    assert desired.from_drop("m", "node-b", 5, None) == d("m", DROP, 5, "node-b")


@pytest.mark.parametrize("version", [None, "3", 0, True])
def test_a_drop_without_a_usable_version_is_the_next_one_of_what_is_held(version):
    held = d("m", SERVE, 4, "node-c", 99.0)
    assert desired.from_drop("m", "node-b", version, held) == d("m", DROP, 5, "node-b")
    assert desired.from_drop("m", "node-b", version, None) == d("m", DROP, 1, "node-b")


# -- bodies --------------------------------------------------------------------------------


def test_a_body_round_trips_and_is_sorted_by_model():
    s = DesiredState([d("zeta", DROP, 2, "a", 1.5), d("alpha", SERVE, 1, "b")])
    body = s.to_body()
    assert list(body["models"]) == ["alpha", "zeta"]
    assert body["models"]["zeta"] == {"state": "dropped", "version": 2, "by": "a", "at": 1.5}
    assert DesiredState(desired.parse(json.loads(json.dumps(body)))) == s


def test_a_newer_nodes_kind_of_decision_is_skipped_not_an_error():
    body = {
        "models": {
            "m": {"state": "pinned", "version": 1, "by": "a"},
            "k": {"state": "dropped", "version": 1, "by": "a"},
        }
    }
    assert [x.model for x in desired.parse(body)] == ["k"]


def test_a_body_without_decisions_is_an_empty_state():
    assert desired.parse({}) == [] and desired.parse({"models": {}}) == []


@pytest.mark.parametrize(
    "body, says",
    [
        ([], "not an object"),
        ({"models": []}, "'models' is not an object"),
        ({"models": {"m": "dropped"}}, "model 'm': the decision is not an object"),
        ({"models": {"m": {"state": "dropped", "version": 0, "by": "a"}}}, "positive integer"),
        ({"models": {"m": {"state": "dropped", "version": 1}}}, "'by' is not a node id"),
        (
            {"models": {"m": {"state": "dropped", "version": 1, "by": "a", "at": "x"}}},
            "'at' is not a number",
        ),
        ({"models": {"": {"state": "dropped", "version": 1, "by": "a"}}}, "not a model name"),
        ({"models": {f"m{i}": {} for i in range(MAX_DECISIONS + 1)}}, "more than the"),
    ],
)
def test_a_bad_body_says_what_is_wrong(body, says):
    with pytest.raises(ValueError, match=says):
        desired.parse(body)


# -- desired.json ------------------------------------------------------------------------------


@pytest.fixture
def state(tmp_path):
    s = StateDir(tmp_path / "state")
    s.ensure()
    return s


def test_desired_json_round_trips_and_is_written_atomically_mode_0600(state):
    decisions = [d("m", DROP, 3, "node-a", 12.5), d("k", SERVE, 1, "node-b")]
    state.save_desired(decisions)
    path = state.path / "desired.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p for p in os.listdir(state.path) if p.endswith(".tmp")] == []  # no leftovers
    assert DesiredState(state.load_desired()) == DesiredState(decisions)
    state.save_desired([d("m", SERVE, 4, "node-c")])  # replaced whole, never appended
    assert state.load_desired() == [d("m", SERVE, 4, "node-c")]


def test_a_missing_desired_json_is_no_decision(state):
    assert state.load_desired() == []


@pytest.mark.parametrize(
    "text, says",
    [
        ("{not json", "is not valid JSON"),
        ("[]", "expected a JSON object with the models' decisions, found a list"),
        ('{"models": {"m": {"state": "gone", "version": 1, "by": "a"}}}', "skipped"),
        (
            '{"models": {"m": {"state": "dropped", "version": -1, "by": "a"}}}',
            "model 'm': version is not a positive integer",
        ),
    ],
)
def test_a_broken_desired_json_stops_the_start_with_one_line_naming_it(state, text, says):
    (state.path / "desired.json").write_text(text)
    if says == "skipped":  # an unknown state (a newer meshd wrote it) is not an error
        assert state.load_desired() == []
        return
    with pytest.raises(StateDirError) as e:
        state.check()  # read at start with every other state file
    message = str(e.value)
    assert "\n" not in message and "desired.json" in message and says in message, message
    if "JSON" not in says:
        assert "remove it: this node learns the mesh's drop/serve decisions again" in message
