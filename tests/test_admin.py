"""
The admin API's parts on a Clock: each field checked and named when
refused, the registry overlaid on gateway.ini's keys and teams, secrets
rotated with a grace that ends on time, a disabled key refused, and a
change made by one process served by another at its next look.
"""

from __future__ import annotations

import hashlib

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from tests.fakes import GATEWAY_HEAD, result_of
from txgateway import errors
from txgateway.admin.control import WATCH_INTERVAL, AdminControl
from txgateway.admin.registry import KEY_FIELDS, AdminInputError, Registry, checked_fields, digest_hex, overlaid
from txgateway.admin.store import SqliteAdminStore
from txgateway.config.gateway import parse_config
from txgateway.errors import GatewayError
from txgateway.front.auth import Authenticator, KeyDisabled

INI = GATEWAY_HEAD + """
[service:primary]
url = http://primary.test/v1
[auth]
keys = caller:caller-secret
[team:ops]
budget_usd = 100
[admin]
keys = root:root-secret
"""


class Log:
    def __init__(self) -> None:
        self.events: list[str] = []

    def info(self, event: str, **fields) -> None:
        self.events.append(event)

    warning = error = info


def done(work):
    """The result of an admin change (a coroutine that, on a Clock and SQLite, has ended already)."""
    return result_of(Deferred.fromCoroutine(work) if not isinstance(work, Deferred) else work)


def control(tmp_path, clock: Clock | None = None) -> tuple[AdminControl, list, Clock]:
    clock = clock or Clock()
    served: list[Registry] = []
    config = parse_config(INI, "test.ini", {})
    made = AdminControl(SqliteAdminStore(str(tmp_path / "state.db"), maybeDeferred), clock, lambda: config, served.append, Log())
    result_of(made.start())
    return made, served, clock


def test_a_field_that_cannot_be_taken_is_named():
    with pytest.raises(AdminInputError) as raised:
        checked_fields({"budget_usd": -1}, KEY_FIELDS)
    assert raised.value.field == "budget_usd"
    with pytest.raises(AdminInputError, match="^colour: no such field"):
        checked_fields({"colour": "red"}, KEY_FIELDS)
    with pytest.raises(AdminInputError, match="^tokens_per_minute: "):
        checked_fields({"tokens_per_minute": True}, KEY_FIELDS)
    assert checked_fields({"models": "a, b*", "team": None}, KEY_FIELDS) == {"models": ["a", "b*"], "team": None}


def test_a_key_made_is_served_with_its_secret_said_once_and_kept_as_a_digest(tmp_path):
    made, served, _ = control(tmp_path)
    answer = done(made.create_key({"name": "alice", "team": "ops", "budget_usd": 5}, "root"))
    secret = answer["secret"]
    assert served[-1].keys["alice"]["secret_sha256"] == digest_hex(secret)
    assert "secret" not in made.key("alice") and made.key("alice")["budget_usd"] == 5
    config = overlaid(parse_config(INI, "test.ini", {}), served[-1], 0.0)
    assert [key.name for key in config.auth.keys] == ["caller", "alice"]
    assert Authenticator(config.auth.keys).name_of(secret.encode()) == "alice"


def test_changes_are_checked_against_what_is_there(tmp_path):
    made, _, _ = control(tmp_path)
    for attempt, kind in (
        (lambda: made.create_key({"name": "caller"}, "root"), errors.CONFLICT),
        (lambda: made.create_key({"name": "x", "team": "nope"}, "root"), errors.BAD_REQUEST),
        (lambda: made.change_key("caller", {"budget_usd": 1}, "root"), errors.CONFLICT),
        (lambda: made.change_key("nobody", {"budget_usd": 1}, "root"), errors.NOT_FOUND),
        (lambda: made.delete_team("ops", "root"), errors.CONFLICT),
        (lambda: made.rotate_key("caller", {}, "root"), errors.CONFLICT),
    ):
        with pytest.raises(GatewayError) as raised:
            done(attempt())
        assert raised.value.kind == kind


def test_a_rotated_secret_stays_valid_for_its_grace_and_is_served_no_more_after(tmp_path):
    made, served, clock = control(tmp_path)
    old = done(made.create_key({"name": "bob"}, "root"))["secret"]
    new = done(made.rotate_key("bob", {"grace_seconds": 10}, "root"))["secret"]
    keys = lambda: overlaid(parse_config(INI, "test.ini", {}), served[-1], clock.seconds()).auth.keys  # noqa: E731
    assert {Authenticator(keys()).name_of(s.encode()) for s in (old, new)} == {"bob"}
    served_before = len(served)
    clock.advance(10)
    clock.advance(WATCH_INTERVAL)
    assert len(served) > served_before  # served again when the grace ended
    assert Authenticator(keys()).name_of(old.encode()) is None and Authenticator(keys()).name_of(new.encode()) == "bob"
    with pytest.raises(GatewayError, match="grace_seconds"):
        done(made.rotate_key("bob", {"grace_seconds": -1}, "root"))


def test_a_disabled_key_is_refused_by_name():
    config = parse_config(INI, "test.ini", {})
    record = {"name": "carl", "secret_sha256": hashlib.sha256(b"carl-secret").hexdigest(), "fields": {}, "disabled": True}
    keys = overlaid(config, Registry(1, {"carl": record}, {}), 0.0).auth.keys
    request = type("Request", (), {
        "header_values": lambda self, name: [b"Bearer carl-secret"] if name == b"authorization" else [],
    })()
    with pytest.raises(KeyDisabled, match="'carl' is disabled"):
        Authenticator(keys).caller(request)


def test_a_change_made_by_one_process_is_served_by_another_at_its_next_look(tmp_path):
    clock = Clock()
    first, _, _ = control(tmp_path, clock)
    second, served, _ = control(tmp_path, clock)
    done(first.create_key({"name": "dana"}, "root"))
    assert "dana" not in second.registry.keys
    clock.advance(WATCH_INTERVAL)
    assert "dana" in served[-1].keys
    entries = result_of(second.audit(10))
    assert [(entry["action"], entry["actor"], entry["name"]) for entry in entries] == [("create", "root", "dana")]
    assert "secret_sha256" not in str(entries)


def two_processes_that_both_saw(tmp_path, name: str) -> tuple[AdminControl, AdminControl, list]:
    """Two processes on one admin store, the key C{name} made by the first and seen by the second at its look."""
    clock = Clock()
    first, _, _ = control(tmp_path, clock)
    second, served, _ = control(tmp_path, clock)
    done(first.create_key({"name": name}, "root"))
    clock.advance(WATCH_INTERVAL)
    assert name in second.registry.keys
    return first, second, served


def test_a_process_a_moment_behind_never_brings_back_a_deleted_key(tmp_path):
    """Before the compare-and-set, the second process's change wrote its stale record back: the key lived again."""
    first, second, served = two_processes_that_both_saw(tmp_path, "dana")
    done(first.delete_key("dana", "root"))
    assert "dana" in second.registry.keys  # its next look has not come yet
    with pytest.raises(GatewayError) as raised:
        done(second.change_key("dana", {"budget_usd": 5}, "root"))
    assert raised.value.kind == errors.NOT_FOUND  # checked again on the store's registry
    assert "dana" not in served[-1].keys
    assert "dana" not in second._store.read_registry().keys


def test_a_process_a_moment_behind_keeps_a_rotation_it_had_not_seen(tmp_path):
    first, second, _ = two_processes_that_both_saw(tmp_path, "erin")
    rotated = done(first.rotate_key("erin", {"grace_seconds": 0}, "root"))["secret"]
    done(second.change_key("erin", {"budget_usd": 7}, "root"))
    stored = second._store.read_registry().keys["erin"]
    assert stored["secret_sha256"] == digest_hex(rotated)  # the rotation stands
    assert stored["fields"]["budget_usd"] == 7  # and the change was made on top of it
    actions = [entry["action"] for entry in result_of(second.audit(10))]
    assert actions == ["change", "rotate", "create"]


def test_the_same_name_made_by_two_processes_at_once_is_made_once(tmp_path):
    clock = Clock()
    first, _, _ = control(tmp_path, clock)
    second, _, _ = control(tmp_path, clock)
    kept = done(first.create_key({"name": "fay"}, "root"))["secret"]
    with pytest.raises(GatewayError) as raised:
        done(second.create_key({"name": "fay"}, "root"))
    assert raised.value.kind == errors.CONFLICT
    assert second._store.read_registry().keys["fay"]["secret_sha256"] == digest_hex(kept)


def test_a_record_that_keeps_moving_is_a_conflict_and_nothing_is_written(tmp_path):
    from twisted.internet.defer import fail

    from txgateway.admin.store import AdminRecordMoved

    made, _, _ = control(tmp_path)
    done(made.create_key({"name": "gus"}, "root"))
    tries = []

    def moving(kind, name, before, record, entry):
        tries.append(name)
        return fail(AdminRecordMoved(f"the {kind} {name!r} was changed meanwhile"))

    made._store.commit = moving
    with pytest.raises(GatewayError) as raised:
        done(made.change_key("gus", {"budget_usd": 1}, "root"))
    assert raised.value.kind == errors.CONFLICT and "try again" in raised.value.message
    assert tries == ["gus", "gus"]  # once, then once more from the store's registry
    assert "budget_usd" not in made._store.read_registry().keys["gus"]["fields"]


def test_a_store_that_stops_answering_is_said_once_and_the_last_registry_is_served(tmp_path):
    made, served, clock = control(tmp_path)
    done(made.create_key({"name": "eve"}, "root"))
    made._store.close()  # the file is gone from under it: every look fails
    log = made._log
    for _ in range(5):
        clock.advance(WATCH_INTERVAL)
    assert log.events.count("admin_store_unavailable") == 1 and "eve" in made.registry.keys
    with pytest.raises(GatewayError) as raised:
        done(made.create_key({"name": "fay"}, "root"))
    assert raised.value.kind == errors.ADMIN_UNAVAILABLE


def test_keys_of_gateway_ini_and_of_its_keys_file_are_listed_read_only_with_where_they_come_from(tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("filed:filed-secret\n")
    config = parse_config(INI.replace("keys = caller:caller-secret", f"keys = caller:caller-secret\nkeys_file = {keys_file}"), "test.ini", {})
    made = AdminControl(SqliteAdminStore(str(tmp_path / "state.db"), maybeDeferred), Clock(), lambda: config, lambda registry: None, Log())
    listed = {key["name"]: (key["source"], key["read_only"]) for key in made.keys()}
    assert listed == {"caller": ("gateway.ini", True), "filed": (f"keys_file {keys_file}", True)}


def test_the_registry_read_at_start_is_served_before_any_look(tmp_path):
    store = SqliteAdminStore(str(tmp_path / "state.db"), maybeDeferred)
    first = AdminControl(store, Clock(), lambda: parse_config(INI, "test.ini", {}), lambda registry: None, Log())
    done(first.create_key({"name": "gus"}, "root"))
    served: list[Registry] = []
    again = AdminControl(store, Clock(), lambda: parse_config(INI, "test.ini", {}), served.append, Log(), store.read_registry())
    again.start()
    assert "gus" in served[0].keys  # at once: no Deferred, no clock moved
