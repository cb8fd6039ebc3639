"""gateway.ini and environment parsing: values, defaults and one-line errors."""

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txgateway.config.gateway import DEFAULT_INI, ConfigError, load_config, parse_config

MINIMAL = """
[service:ai]
url = http://localhost:8000
"""


def test_minimal_file_gets_every_default():
    config = parse_config(MINIMAL, environ={})
    assert config.gateway.listen == "tcp:3000"
    assert config.gateway.max_body_size == 10485760
    assert config.gateway.deadline == 120.0
    assert config.logging.level == "info"
    assert config.logging.file == "logs/combined.log"
    assert config.ratelimit.requests == 100
    assert config.ratelimit.window == 60.0
    assert config.ratelimit.backend == "memory"
    ai = config.services["ai"]
    assert (ai.timeout, ai.idle_timeout, ai.retries) == (30.0, 60.0, 3)
    assert (ai.retry_delay, ai.retry_multiplier, ai.retry_max_delay, ai.retry_jitter) == (1.0, 2.0, 30.0, 0.0)
    assert (ai.breaker_threshold, ai.breaker_cooldown) == (5, 60.0)
    assert ai.deadline == 120.0


def test_service_deadline_defaults_to_the_gateway_deadline():
    config = parse_config("[gateway]\ndeadline = 7.5\n" + MINIMAL, environ={})
    assert config.services["ai"].deadline == 7.5


def test_any_number_of_services_each_with_its_own_keys():
    config = parse_config(
        """
        [service:ai]
        url = http://localhost:8000/v1/
        timeout = 2.5
        [service:embed-2]
        url = https://embed.internal:9443
        retries = 0
        """.replace("        ", ""),
        environ={},
    )
    assert set(config.services) == {"ai", "embed-2"}
    assert config.services["ai"].url == "http://localhost:8000/v1"
    assert config.services["ai"].timeout == 2.5
    assert config.services["embed-2"].retries == 0


def test_embedded_defaults_match_the_sample_gateway_ini():
    sample = os.path.join(os.path.dirname(__file__), os.pardir, "gateway.ini")
    assert load_config(sample, environ={}).services == load_config(None, environ={}).services
    assert load_config(sample, environ={}).gateway == parse_config(DEFAULT_INI, environ={}).gateway


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[service:ai]\nurl = http://x\ntimeout = abc\n", "test.ini: [service:ai] timeout: expected a number of seconds, got 'abc'"),
        ("[service:ai]\nurl = http://x\ntimout = 3\n", "test.ini: [service:ai] timout: unknown key"),
        ("[service:ai]\ntimeout = 3\n", "test.ini: [service:ai] url: missing"),
        ("[service:ai]\nurl = ftp://x\n", "test.ini: [service:ai] url: expected an http:// or https:// URL"),
        ("[gateway]\nmax_body_size = -1\n" + MINIMAL, "test.ini: [gateway] max_body_size: expected a whole number of at least 1"),
        ("[gateway]\nmax_connections = 0\n" + MINIMAL, "test.ini: [gateway] max_connections: expected auto or a whole number of connections of at least 1, got '0'"),
        ("[gateway]\nmax_connections = many\n" + MINIMAL, "test.ini: [gateway] max_connections: expected auto or a whole number"),
        ("[logging]\nlevel = loud\n" + MINIMAL, "test.ini: [logging] level: expected one of debug, info"),
        ("[ratelimit]\nbackend = etcd\n" + MINIMAL, "test.ini: [ratelimit] backend: expected one of memory, redis"),
        ("[ratelimit]\nkey = cookie\n" + MINIMAL, "test.ini: [ratelimit] key: expected ip, api_key or header:<Name>"),
        ("[gatway]\nlisten = tcp:1\n" + MINIMAL, "test.ini: [gatway]: unknown section"),
        ("[service:a/b]\nurl = http://x\n", "test.ini: [service:a/b]: a service name is"),
        ("[gateway]\nlisten = tcp:1\n", "test.ini: no [service:NAME] section"),
        ("[service:ai]\nurl = http://x\nretry_jitter = 2\n", "test.ini: [service:ai] retry_jitter: expected a number from 0 to 1"),
        ("[service:ai]\nurl = http://x\n[service:ai]\nurl = http://y\n", "test.ini: While reading from 'test.ini' [line 3]: section 'service:ai' already exists"),
        ("no section here\n", "test.ini: File contains no section headers."),
        ("[ratelimit]\nredis_url = http://x:1/0\n" + MINIMAL, "test.ini: [ratelimit] redis_url: expected redis://host:port/db or redis+sentinel://"),
        ("[cache]\nredis_url = redis+sentinel://127.0.0.1:26379\n" + MINIMAL, "test.ini: [cache] redis_url: expected the master's name"),
        ("[budgets]\nredis_url = redis+sentinel://h:1,h:x/m\n" + MINIMAL, "test.ini: [budgets] redis_url: expected host:port in"),
        ("[ratelimit]\nredis_url = redis://h:6379/zero\n" + MINIMAL, "test.ini: [ratelimit] redis_url: expected a database number"),
    ],
)
def test_a_bad_file_fails_with_one_line_naming_file_section_and_key(text, expected):
    with pytest.raises(ConfigError) as raised:
        parse_config(text, "test.ini", environ={})
    message = str(raised.value)
    assert message.startswith(expected)
    assert "\n" not in message


@pytest.mark.parametrize("value, expected", [("auto", None), (" AUTO ", None), ("1", 1), ("20000", 20000)])
def test_max_connections_is_auto_or_a_count(value, expected):
    assert parse_config(f"[gateway]\nmax_connections = {value}\n" + MINIMAL, environ={}).gateway.max_connections == expected
    assert parse_config(MINIMAL, environ={}).gateway.max_connections is None  # auto by default


def test_a_missing_file_is_named():
    with pytest.raises(ConfigError, match=r"^/nonexistent/gateway.ini: cannot read the configuration: No such file"):
        load_config("/nonexistent/gateway.ini", environ={})


def test_environment_overrides_follow_the_seed_names():
    config = parse_config(
        MINIMAL + "[service:rag-v2]\nurl = http://localhost:8002\n",
        environ={
            "PORT": "4000",
            "AI_SERVICE_URL": "http://10.0.0.5:9000/v1",
            "RAG_V2_SERVICE_URL": "http://rag:1",
            "LOG_LEVEL": "debug",
            "RATE_LIMIT_MAX_REQUESTS": "7",
            "RATE_LIMIT_WINDOW_MS": "1500",
        },
    )
    assert config.gateway.listen == "tcp:4000"
    assert config.services["ai"].url == "http://10.0.0.5:9000/v1"
    assert config.services["rag-v2"].url == "http://rag:1"
    assert config.logging.level == "debug"
    assert config.ratelimit.requests == 7
    assert config.ratelimit.window == 1.5


def test_port_override_keeps_the_listen_options():
    config = parse_config("[gateway]\nlisten = tcp:3000:interface=127.0.0.1\n" + MINIMAL, environ={"PORT": "4001"})
    assert config.gateway.listen == "tcp:4001:interface=127.0.0.1"


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"PORT": "http"}, "environment variable PORT: expected a TCP port number"),
        ({"AI_SERVICE_URL": "localhost:8000"}, "environment variable AI_SERVICE_URL: [service:ai] url: expected an http"),
        ({"RATE_LIMIT_WINDOW_MS": "soon"}, "environment variable RATE_LIMIT_WINDOW_MS: expected milliseconds"),
        ({"LOG_LEVEL": "chatty"}, "environment variable LOG_LEVEL: [logging] level:"),
    ],
)
def test_a_bad_environment_variable_is_named(environ, expected):
    with pytest.raises(ConfigError) as raised:
        parse_config(MINIMAL, "test.ini", environ=environ)
    assert str(raised.value).startswith(expected)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_no_text_makes_the_parser_raise_anything_but_config_error(text):
    try:
        parse_config(text, "fuzz.ini", environ={})
    except ConfigError as error:
        assert "\n" not in str(error)


@settings(max_examples=200, deadline=None)
@given(
    key=st.sampled_from(["timeout", "retries", "retry_delay", "retry_multiplier", "breaker_threshold", "url", "retry_jitter"]),
    value=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=40),
)
def test_no_value_of_a_known_key_raises_anything_but_config_error(key, value):
    try:
        parse_config(f"[service:ai]\nurl = http://x\n{key} = {value}\n", "fuzz.ini", environ={})
    except ConfigError as error:
        assert "[service:ai]" in str(error) or "fuzz.ini" in str(error)


def test_a_service_url_may_list_several_endpoints():
    from txgateway.config.gateway import parse_config

    config = parse_config("[service:s]\nurl = http://a:1/v1/ ,https://b:2\nbalance = round_robin\n", "t.ini", environ={})
    service = config.services["s"]
    assert service.endpoint_urls == ("http://a:1/v1", "https://b:2")
    assert service.balance == "round_robin"


@pytest.mark.parametrize(
    "value, complaint",
    [("http://a:1,", "separated by commas"), ("http://a:1, ftp://b", "expected an http://"), ("http://a:1, http://a:1", "given twice")],
)
def test_a_bad_endpoint_list_is_named(value, complaint):
    from txgateway.config.gateway import ConfigError, parse_config

    with pytest.raises(ConfigError, match=rf"t.ini: \[service:s\] url: .*{complaint}"):
        parse_config(f"[service:s]\nurl = {value}\n", "t.ini", environ={})


@pytest.mark.parametrize(
    "fallback, complaint",
    [("nowhere", "no service is named 'nowhere'"), ("a", "cannot be its own fallback")],
)
def test_a_fallback_must_name_another_service(fallback, complaint):
    from txgateway.config.gateway import ConfigError, parse_config

    with pytest.raises(ConfigError, match=rf"t.ini: \[service:a\] fallback: .*{complaint}"):
        parse_config(f"[service:a]\nurl = http://a:1\nfallback = {fallback}\n[service:b]\nurl = http://b:1\n", "t.ini", environ={})


def test_the_embedded_defaults_serve_openais_api_from_the_ai_backend():
    config = load_config(None, environ={})
    assert config.services["ai"].api == "http"  # /api/ai/* still relays bytes
    assert config.services["ai-openai"].url == "http://localhost:8000/v1" and config.services["ai-openai"].speaks_openai
    [target] = config.models["*"].targets
    assert target.service == "ai-openai" and target.model_for("anything") == "anything"


def test_ai_service_url_moves_the_openai_api_with_it_on_the_embedded_defaults():
    config = load_config(None, environ={"AI_SERVICE_URL": "http://10.0.0.5:9000/"})
    assert config.services["ai"].url == "http://10.0.0.5:9000"
    assert config.services["ai-openai"].url == "http://10.0.0.5:9000/v1"
    own = load_config(None, environ={"AI_SERVICE_URL": "http://a:1", "AI_OPENAI_SERVICE_URL": "http://b:2/v1"})
    assert own.services["ai-openai"].url == "http://b:2/v1"


def test_the_shipped_governed_example_loads_with_every_key_team_and_budget():
    path = Path(__file__).resolve().parents[1] / "contrib" / "governed.ini"
    config = parse_config(path.read_text(), str(path), {"OPENAI_API_KEY": "sk-test"})
    keys = {key.name: key for key in config.auth.keys}
    assert set(keys) == {"search-prod", "chat-app", "notebooks"} and all(key.governed for key in keys.values())
    assert keys["search-prod"].team == "search" and keys["search-prod"].budget_usd == 300
    assert keys["chat-app"].limits_users and keys["chat-app"].user_budget_usd == 2
    assert config.teams["search"].budget_usd == 500 and config.admin.enabled
    assert config.models["qwen"].reserve_completion_tokens == 512 and config.prices["gpt-4o-mini"].completion == 0.6
    assert config.gateway.listen == "tcp:3000:interface=127.0.0.1"
