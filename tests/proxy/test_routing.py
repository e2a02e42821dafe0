"""Route matching, with property tests: the right dataset for every path the table matches,
and no escape through percent-escapes or dot segments."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bascule.config import Route
from bascule.errors import RouteError
from proxy.routing import UNROUTED, Router, split_path

ROUTES = (
    Route(path="/v1/datasets", methods=("GET",), kind="read", dataset="default"),
    Route(path="/v1/datasets/{dataset}/records", methods=("GET",), kind="read"),
    Route(
        path="/v1/datasets/{dataset}/records",
        methods=("POST",),
        kind="write",
        create_id="/record/id",
        replay_as="PUT /v1/datasets/{dataset}/records/{id}",
    ),
    Route(path="/v1/datasets/{dataset}/records/{id}", methods=("GET",), kind="read", key="id"),
    Route(
        path="/v1/datasets/{dataset}/records/{id}",
        methods=("PUT", "PATCH", "DELETE"),
        kind="write",
        key="id",
    ),
    Route(path="/v1/datasets/{dataset}/query", methods=("POST",), kind="read"),
    Route(path="/v1/admin/{dataset}", methods=("POST",), kind="write"),
    Route(path="/v1/stats", methods=("GET",), kind="read", dataset="cepidc"),
)
DATASETS = ("default", "dcir", "pmsi", "cepidc", "admin")
router = Router(ROUTES, DATASETS)

names = st.sampled_from(DATASETS)
keys = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="/\\"),
    min_size=1,
    max_size=20,
).filter(lambda k: k not in (".", "..") and all(ord(c) >= 32 and c != "\x7f" for c in k))


def test_examples() -> None:
    m = router.match("GET", "/v1/datasets/dcir/records/42")
    assert (m.dataset, m.kind, m.key, m.template) == (
        "dcir",
        "read",
        "42",
        "/v1/datasets/{dataset}/records/{id}",
    )
    m = router.match("POST", "/v1/datasets/pmsi/query")
    assert (m.dataset, m.kind, m.key) == ("pmsi", "read", None)
    m = router.match("POST", "/v1/datasets/pmsi/records")
    assert (m.dataset, m.kind) == ("pmsi", "write")
    assert m.route is not None and m.route.create_id == "/record/id"
    assert router.match("GET", "/v1/stats").dataset == "cepidc"


def test_unrouted_requests_go_to_default_with_kind_from_method() -> None:
    assert router.match("GET", "/healthz") == router.match("GET", "/healthz")
    m = router.match("GET", "/v2/other")
    assert (m.dataset, m.kind, m.template, m.route) == ("default", "read", UNROUTED, None)
    assert router.match("DELETE", "/v2/other").kind == "write"
    # A method the route does not declare does not match it.
    assert router.match("DELETE", "/v1/datasets/dcir/records").template == UNROUTED


def test_first_match_wins() -> None:
    first = Route(path="/v1/datasets/{dataset}/x", methods=("GET",), kind="read")
    second = Route(path="/v1/datasets/{dataset}/x", methods=("GET",), kind="write")
    assert Router((first, second), DATASETS).match("GET", "/v1/datasets/dcir/x").kind == "read"


def test_unknown_dataset_is_refused() -> None:
    with pytest.raises(RouteError) as info:
        router.match("GET", "/v1/datasets/snds_secret/records")
    assert (info.value.status, info.value.code) == (404, "unknown_dataset")
    assert "'snds_secret'" in str(info.value)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/datasets/../admin",
        "/v1/datasets/dcir/../../admin/records",
        "/v1/datasets/%2e%2e/records",
        "/v1/datasets/.%2E/records",
        "/v1/datasets/dcir%2F..%2Fpmsi/records",
        "/v1/datasets/dcir%5c..%5cpmsi/records",
        "/v1/datasets//dcir/records",
        "/v1/datasets/dcir/records/",
        "/v1/datasets/./dcir/records",
        "/v1/datasets/dcir/records/%zz",
        "/v1/datasets/dcir/records/%ff",
        "/v1/datasets/dcir/records/a%00b",
        "v1/datasets/dcir/records",
    ],
)
def test_paths_that_could_be_read_two_ways_are_refused(path: str) -> None:
    with pytest.raises(RouteError) as info:
        router.match("GET", path)
    assert (info.value.status, info.value.code) == (400, "bad_path")


def test_escaped_dataset_routes_as_the_backend_reads_it() -> None:
    assert router.match("GET", "/v1/datasets/dc%69r/records").dataset == "dcir"
    assert router.match("GET", "/v1/datasets/dcir/records/a%20b").key == "a b"


@given(dataset=names, key=keys)
def test_any_matched_path_yields_its_dataset_and_key(dataset: str, key: str) -> None:
    path = f"/v1/datasets/{quote(dataset)}/records/{quote(key, safe='')}"
    for method, kind in (("GET", "read"), ("PUT", "write"), ("PATCH", "write")):
        m = router.match(method, path)
        assert (m.dataset, m.key, m.kind) == (dataset, key, kind)


def _encode(segment: str, picks: list[bool]) -> str:
    """Percent-encode a decoded segment: characters that need it always, others when picked."""
    out = []
    for i, ch in enumerate(segment):
        needed = quote(ch, safe="") != ch
        out.append(
            quote(ch, safe="") if needed else f"%{ord(ch):02X}" if picks[i % len(picks)] else ch
        )
    return "".join(out)


@given(dataset=names, key=keys, picks=st.lists(st.booleans(), min_size=1, max_size=8))
def test_escaping_characters_never_changes_the_route(
    dataset: str, key: str, picks: list[bool]
) -> None:
    segments = ["v1", "datasets", dataset, "records", key]
    plain = "/" + "/".join(_encode(s, [False]) for s in segments)
    escaped = "/" + "/".join(_encode(s, picks) for s in segments)
    assert router.match("GET", escaped) == router.match("GET", plain)
    assert router.match("GET", escaped).key == key


_DOTS = st.sampled_from(["..", ".", "%2e%2e", "%2E.", ".%2e", "%2e", "", "a%2f..", "x%5C.."])


@given(
    dataset=names,
    insert_at=st.integers(min_value=0, max_value=5),
    dots=st.lists(_DOTS, min_size=1, max_size=3),
    tail=st.sampled_from(["records", "records/1", "query", "admin"]),
)
def test_dot_segments_anywhere_are_refused(
    dataset: str, insert_at: int, dots: list[str], tail: str
) -> None:
    segments = ["v1", "datasets", dataset, *tail.split("/")]
    at = min(insert_at, len(segments))
    path = "/" + "/".join(segments[:at] + dots + segments[at:])
    with pytest.raises(RouteError):
        router.match("GET", path)


@given(path=st.text(max_size=40).map(lambda s: "/" + s))
def test_any_accepted_path_has_only_plain_segments(path: str) -> None:
    try:
        segments = split_path(path)
    except RouteError:
        return
    for seg in segments:
        assert seg not in ("", ".", "..")
        assert "/" not in seg and "\\" not in seg
    try:
        m = router.match("GET", path)
    except RouteError as exc:
        assert exc.code == "unknown_dataset"
        return
    assert m.dataset in DATASETS


# --- issue 16: keys of any length, and ambiguous paths routed with their candidates ---------


keyed = Router(
    (
        Route(
            path="/r/{dataset}/{id}", methods=("GET",), kind="read", key="id", key_format="integer"
        ),
    ),
    DATASETS,
)


def test_a_key_of_thousands_of_digits_is_named_without_int() -> None:
    """int() of a 5,000-digit key raised ValueError (Python's int-str conversion limit): a
    500 with a traceback for each such request."""
    m = keyed.match("GET", "/r/dcir/" + "0" * 3 + "9" * 5000)
    assert m.key == "9" * 5000
    assert keyed.match("GET", "/r/dcir/000").key == "0"


def test_route_keeps_what_match_refuses_with_every_dataset_it_could_be() -> None:
    m = router.route("GET", "/v1/datasets//dcir/records/7")
    assert m.refused is not None and m.refused.code == "bad_path"
    assert (m.dataset, m.template, m.candidates) == (
        "default",
        UNROUTED,
        frozenset({"default", "dcir"}),
    )
    # Every reading is dcir's record route (';' stripped or not): its dataset and route.
    m = router.route("PUT", "/v1/datasets/dcir/records/7;v=1")
    assert (m.dataset, m.kind, m.key, m.candidates) == ("dcir", "write", None, frozenset({"dcir"}))
    assert m.template == "/v1/datasets/{dataset}/records/{id}"
    # A path that could be read as an undeclared dataset is refused as one.
    with pytest.raises(RouteError) as info:
        router.route("GET", "/v1/datasets/dcir%2F..%2Fsecret/records")
    assert info.value.code == "unknown_dataset"
    # A traversal into another dataset names it, beside the unrouted reading.
    m = router.route("GET", "/v1/datasets/dcir/..%2Fpmsi/records")
    assert m.candidates == {"default", "pmsi"}
    # A key the route's format does not read: its dataset is known.
    m = keyed.route("GET", "/r/dcir/abc")
    assert m.refused is not None and m.refused.code == "bad_key"
    assert (m.dataset, m.key, m.candidates) == ("dcir", None, frozenset({"dcir"}))


@given(path=st.text(max_size=40).map(lambda s: "/" + s), method=st.sampled_from(["GET", "PUT"]))
def test_route_agrees_with_match_and_refuses_only_undeclared_datasets(
    path: str, method: str
) -> None:
    try:
        exact = router.match(method, path)
    except RouteError:
        exact = None
    try:
        m = router.route(method, path)
    except RouteError as exc:
        assert exc.code == "unknown_dataset"
        return
    if exact is not None:
        assert m == exact
    else:
        assert m.refused is not None and m.candidates
        assert m.candidates <= set(DATASETS)
        assert m.dataset in m.candidates or m.dataset == "default"
