"""The V2 infer path, parsed once for the fast path, the auth scopes and the routes."""

from __future__ import annotations

from importlib.metadata import version

import pytest

from serving.auth.scopes import INFER, READ, required_scope
from serving.protocol import SERVER_NAME, SERVER_VERSION, parse_infer_path


@pytest.mark.parametrize(
    ("path", "parsed"),
    [
        ("/v2/models/digits/infer", ("digits", None)),
        ("/v2/models/digits/versions/2/infer", ("digits", "2")),
        ("/v2/models/a.b-c_d/versions/latest/infer", ("a.b-c_d", "latest")),
        # A model may be called "versions"; only the 7-segment shape names a version.
        ("/v2/models/versions/infer", ("versions", None)),
    ],
)
def test_infer_paths_give_model_and_version(path: str, parsed: tuple[str, str | None]) -> None:
    assert parse_infer_path(path) == parsed


@pytest.mark.parametrize(
    "path",
    [
        "/v2/models//infer",
        "/v2/models/digits/versions//infer",
        "/v2/models//versions/1/infer",
        "/v2/models/digits/extra/infer",
        "/v2/models/digits/versions/1/extra/infer",
        "/v2/models/digits/revisions/1/infer",
        "/v2/models/digits/infer/",
        "/v2/models/digits/inference",
        "/v2/models/digits",
        "/v2/models/digits/ready",
        "/v1/models/digits/infer",
        "/v2/model/digits/infer",
        "v2/models/digits/infer",
        "//v2/models/digits/infer",
        "/v2/models/digits/versions/1/infer/more",
        "",
        "/",
    ],
)
def test_malformed_paths_are_not_infer_paths(path: str) -> None:
    assert parse_infer_path(path) is None


def test_auth_asks_infer_scope_exactly_for_infer_paths() -> None:
    assert required_scope("POST", "/v2/models/digits/versions/3/infer") == (INFER, "digits")
    assert required_scope("POST", "/v2/models/digits/infer") == (INFER, "digits")
    # Not an infer path: reading it needs read, not infer on "digits".
    assert required_scope("POST", "/v2/models/digits/extra/infer") == (READ, "")
    assert required_scope("GET", "/v2/models/digits/infer") == (READ, "")


def test_server_version_is_the_installed_package_version() -> None:
    assert SERVER_NAME == "fermion"
    assert version("fermion") == SERVER_VERSION
