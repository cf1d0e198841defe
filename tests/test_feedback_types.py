"""Feedback fields of the wrong type get a 400 in OpenAI's shape naming the field, and change nothing."""

from __future__ import annotations

import pytest

from .test_server import ask, make, stored

WRONG = {
    "id": [5, 0, 1.5, True, None, ["chatcmpl-x"], {"id": "chatcmpl-x"}],
    "outcome": [1, 0, True, False, 0.5, ["success"], {"value": "success"}, "Success", ""],
    "rating": [True, False, "0.7", "1", [0.5], {"value": 0.5}, 1.5, -0.1],
}
CASES = [(field, value) for field, values in WRONG.items() for value in values]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("feedback")
    c, dr = make(tmp)
    rid = ask(c).json()["id"]
    return c, dr, tmp, rid


@pytest.mark.parametrize("field, value", CASES, ids=[f"{f}={v!r}" for f, v in CASES])
def test_a_wrong_type_is_a_400_naming_the_field(server, field, value):
    c, dr, tmp, rid = server
    before = stored(dr, tmp / "s.db")
    body = {"id": rid, "outcome": "success"} if field != "rating" else {"id": rid, "rating": 0.5}
    body[field] = value
    r = c.post("/v1/feedback", json=body)
    assert r.status_code == 400, (body, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == "invalid_request_error" and err["param"] == field and field in err["message"]
    assert stored(dr, tmp / "s.db") == before  # no trust change, no ledger entry


@pytest.mark.parametrize("rating", [0, 1, 0.0, 0.25, 1.0])
def test_numbers_in_range_are_ratings(tmp_path, rating):
    c, dr = make(tmp_path)
    rid = ask(c).json()["id"]
    r = c.post("/v1/feedback", json={"id": rid, "rating": rating})
    assert r.status_code == 200, r.text
    assert r.json()["reward"] == pytest.approx(rating)
