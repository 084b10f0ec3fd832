"""UPSTREAM_URL: only an http(s) URL with a host, an optional ASCII-digit port and a path."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.config import Config, ConfigError

GOOD = [
    ("http://127.0.0.1:9000", "http://127.0.0.1:9000"),
    ("https://api.example.com/v1/", "https://api.example.com/v1"),
    ("http://[::1]:8080/v1", "http://[::1]:8080/v1"),
    ("HTTPS://api.example.com/v1", "https://api.example.com/v1"),
    ("http://up-stream.internal/openai/v1%2Fx", "http://up-stream.internal/openai/v1%2Fx"),
    ("http://host:65535/a/b;c=d/@e", "http://host:65535/a/b;c=d/@e"),
]

BAD = [
    # query, fragment
    ("http://host/v1?x=1", "query"),
    ("http://host/v1?", "query"),
    ("http://host/v1#frag", "fragment"),
    ("http://host?x=1", "query"),
    # whitespace and control characters anywhere
    ("http://host/v1 evil", "whitespace"),
    ("http://host/v1\tevil", "whitespace"),
    ("http://ho st/v1", "whitespace"),
    ("http://host/v1\x00", "control"),
    ("http://host/v1\x7f", "control"),
    ("http://host/v1\r\nX-Evil: 1", "control"),
    ("http://host\u2028/v1", "control"),
    ("http://host/v1\u00a0x", "ASCII"),
    # userinfo
    ("http://user:pw@host/v1", "credentials"),
    ("http://user@host/v1", "credentials"),
    ("http://@host/v1", "credentials"),
    # ports
    ("http://host:8_080/v1", "port"),
    ("http://host:+80/v1", "port"),
    ("http://host:-80/v1", "port"),
    ("http://host: 80/v1", "whitespace"),
    ("http://host:\u0668\u0660/v1", "ASCII"),  # Arabic-Indic digits
    ("http://host:\uff18\uff10/v1", "ASCII"),  # full-width digits
    ("http://host:0/v1", "port"),
    ("http://host:65536/v1", "port"),
    ("http://host:99999/v1", "port"),
    ("http://host:/v1", "port"),
    ("http://host:80:81/v1", "port"),
    ("http://host:0x50/v1", "port"),
    # hosts
    ("http:///v1", "host"),
    ("http://:80/v1", "host"),
    ("http://ho_st/v1", "host"),
    ("http://-host/v1", "host"),
    ("http://host..example/v1", "host"),
    ("http://[::1/v1", "IPv6"),
    ("http://[zz::1]/v1", "IPv6"),
    ("http://[::1]x/v1", "IPv6"),
    ("http://h\u00f6st/v1", "ASCII"),
    # schemes and shapes
    ("localhost:9000", "http"),
    ("ftp://host/v1", "http"),
    ("http:/host/v1", "http"),
    ("//host/v1", "http"),
    ("http://host/v1/<script>", "path"),
    ("http://host/v1/%zz", "path"),
    ("http://host\\@evil/v1", "credentials"),
]


@pytest.mark.parametrize(("value", "expected"), GOOD)
def test_good_urls_are_accepted_and_normalised(value, expected):
    assert Config.from_env({"UPSTREAM_URL": value}).upstream_url == expected


@pytest.mark.parametrize(("value", "fragment"), BAD)
def test_bad_urls_stop_the_start_naming_the_variable(value, fragment):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"UPSTREAM_URL": value})
    message = str(caught.value)
    assert caught.value.variable == "UPSTREAM_URL"
    assert message.startswith("UPSTREAM_URL: ")
    assert fragment.lower() in message.lower()
    assert "\n" not in message
    assert value not in message  # never echoed: it may hold credentials


_BAD_CHARS = st.sampled_from(
    [" ", "\t", "\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u00a0", "\u2028", "\u3000", "?", "#"]
)


@given(
    prefix=st.sampled_from(["http://", "http://host", "http://host:80", "http://host/v1"]),
    bad=_BAD_CHARS,
    suffix=st.text(alphabet="abc/:019", max_size=6),
)
def test_any_whitespace_control_query_or_fragment_character_is_refused(prefix, bad, suffix):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({"UPSTREAM_URL": f"{prefix}{bad}x{suffix}"})
    assert caught.value.variable == "UPSTREAM_URL"


# ("/" would end the authority: `host:1//v1` is port 1 and the path //v1)
@given(port=st.text(min_size=1, max_size=6).filter(lambda port: "/" not in port))
def test_port_is_accepted_only_as_ascii_digits_in_range(port):
    url = f"http://host:{port}/v1"
    try:
        config = Config.from_env({"UPSTREAM_URL": url})
    except ConfigError as exc:
        assert exc.variable == "UPSTREAM_URL"
        return
    text = port.strip()
    assert text.isascii() and text.isdigit() and 1 <= int(text) <= 65535
    assert config.upstream_url == f"http://host:{text}/v1"


@given(value=st.text(max_size=40).map(lambda tail: "http://" + tail))
def test_whatever_is_accepted_has_only_scheme_host_port_and_path(value):
    try:
        url = Config.from_env({"UPSTREAM_URL": value}).upstream_url
    except ConfigError as exc:
        assert exc.variable == "UPSTREAM_URL"
        return
    assert url is not None
    parts = urlsplit(url)
    assert parts.scheme in ("http", "https")
    assert parts.hostname
    assert not parts.query and not parts.fragment
    assert parts.username is None and parts.password is None
    assert url.isascii() and url.isprintable() and " " not in url
    if parts.port is not None:
        assert str(parts.port) == parts.netloc.rsplit(":", 1)[1]
