"""
L{AdminControl}: what the admin API does with keys and teams, between
its routes and its store.  It checks each change against what is there
(gateway.ini's own keys and teams are read-only), writes it with its audit
entry, and has it served: at once in this process, and by every other
process within L{WATCH_INTERVAL} (each watches the store's version and
loads the registry again when it moves).
"""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable, TypeVar

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

from txgateway import errors
from txgateway.admin.registry import (
    KEY_FIELDS,
    TEAM_FIELDS,
    AdminInputError,
    Registry,
    checked_fields,
    checked_name,
    configured_key,
    configured_team,
    digest_hex,
    new_secret,
    public_key,
    public_team,
)
from txgateway.admin.store import AdminRecordMoved, AdminStoreFailed, IAdminStore
from txgateway.errors import GatewayError

__all__ = ["AdminControl", "DEFAULT_GRACE", "MOST_GRACE", "WATCH_INTERVAL"]

#: Seconds between two looks at the store's version (a change is served everywhere within it).
WATCH_INTERVAL = 0.5
#: Seconds a rotated key's earlier secret stays valid unless the rotation says otherwise.
DEFAULT_GRACE = 3600.0
#: The longest grace a rotation may give (30 days).
MOST_GRACE = 30 * 86400.0


def _bad(error: AdminInputError) -> GatewayError:
    return GatewayError(errors.BAD_REQUEST, str(error))


_Change = TypeVar("_Change", bound=Callable[..., Awaitable[dict]])


def _once_more_if_moved(change: _Change) -> _Change:
    """
    A change made from a registry a moment old (another process changed the
    record since this one last looked) is made again once from the store's
    registry, checked anew; moved again, it is 409 C{conflict}.  Nothing is
    ever written over a change this process has not seen.
    """

    @functools.wraps(change)
    async def made(self: "AdminControl", *args: Any) -> dict:
        try:
            return await change(self, *args)
        except AdminRecordMoved:
            try:
                await self._reload()
            except AdminStoreFailed as error:
                raise GatewayError(errors.ADMIN_UNAVAILABLE, f"{error}; nothing was changed") from None
        try:
            return await change(self, *args)
        except AdminRecordMoved as moved:
            raise GatewayError(errors.CONFLICT, f"{moved} by another admin: nothing was changed; read it and try again") from None

    return made  # type: ignore[return-value]


class AdminControl:
    """
    Keys, teams and the audit trail of the admin API.

    @param store: where they are kept (L{IAdminStore}).
    @param configured: the configuration as gateway.ini says it (its keys
        and teams read-only), asked anew each time (a SIGHUP changes it).
    @param serve: called with each new L{Registry}: the process serves it.
    """

    def __init__(
        self, store: IAdminStore, clock: IReactorTime, configured: Callable[[], Any], serve: Callable[[Registry], None], log: Any,
        initial: Registry | None = None,
    ) -> None:
        if not IAdminStore.providedBy(store):
            raise TypeError(f"the admin store must provide IAdminStore, got {store!r}")
        self._store = store
        self._clock = clock
        self._configured = configured
        self._serve = serve
        self._log = log
        #: The registry read at start, served by L{start} at once (L{None}: loaded then, asynchronously).
        self._initial = initial
        self.registry = Registry()
        self._watch: LoopingCall | None = None
        self._looking: Deferred | None = None
        #: When a retired secret's grace ends next (the registry is served again then, without it).
        self._next_expiry: float | None = None
        #: The last look at the store failed (said once, and once when it answers again).
        self._failing = False

    # -- serving what the store holds

    def start(self) -> Deferred[None]:
        """Serve the registry (the one read at start, else loaded now), and watch the store's version."""
        self._watch = LoopingCall(self._look)
        self._watch.clock = self._clock
        self._watch.start(WATCH_INTERVAL, now=False)
        if self._initial is not None:
            initial, self._initial = self._initial, None
            self._use(initial)
            return succeed(None)
        return self._reload()

    def stop(self) -> None:
        """Stop watching."""
        if self._watch is not None and self._watch.running:
            self._watch.stop()

    def close(self) -> Any:
        """Stop watching and release the store (a L{Deferred} or L{None})."""
        self.stop()
        return self._store.close()

    def _look(self) -> None:
        if self._looking is not None:
            return
        now = self._clock.seconds()
        if self._next_expiry is not None and now >= self._next_expiry:
            self._use(self.registry)  # a grace period ended: that secret is no longer valid
        looking = self._looking = self._store.version()

        def seen(version: int) -> Deferred | None:
            if self._failing:
                self._failing = False
                self._log.warning("admin_store_recovered")
            if version != self.registry.version:
                return self._reload()
            return None

        def failed(failure: Any) -> None:
            if not self._failing:  # said once when it starts failing, not every look
                self._failing = True
                self._log.warning("admin_store_unavailable", reason=failure.getErrorMessage(), serving="the last registry loaded")

        def done(result: Any) -> None:
            self._looking = None

        looking.addCallback(seen).addErrback(failed).addBoth(done)

    def _reload(self) -> Deferred[None]:
        def loaded(registry: Registry) -> None:
            if registry.version >= self.registry.version:
                self._use(registry)

        return self._store.registry().addCallback(loaded)

    def _use(self, registry: Registry) -> None:
        self.registry = registry
        self._next_expiry = registry.next_expiry(self._clock.seconds())
        self._serve(registry)

    # -- reading

    def keys(self) -> list[dict]:
        """Every key: gateway.ini's and its keys file's (read-only, with where they come from), then the admin API's."""
        config = self._configured()
        listed = [configured_key(key, key.origin) for key in config.auth.keys]
        return listed + [public_key(record) for _, record in sorted(self.registry.keys.items())]

    def key(self, name: str) -> dict:
        """
        @raise GatewayError: C{not_found}.
        """
        record = self.registry.keys.get(name)
        if record is not None:
            return public_key(record)
        for key in self._configured().auth.keys:
            if key.name == name:
                return configured_key(key, key.origin)
        raise GatewayError(errors.NOT_FOUND, f"no key is named {name!r}")

    def teams(self) -> list[dict]:
        """Every team: gateway.ini's (read-only), then the admin API's."""
        config = self._configured()
        listed = [configured_team(team, "gateway.ini") for _, team in sorted(config.teams.items())]
        return listed + [public_team(record) for _, record in sorted(self.registry.teams.items())]

    def team(self, name: str) -> dict:
        """
        @raise GatewayError: C{not_found}.
        """
        record = self.registry.teams.get(name)
        if record is not None:
            return public_team(record)
        team = self._configured().teams.get(name)
        if team is not None:
            return configured_team(team, "gateway.ini")
        raise GatewayError(errors.NOT_FOUND, f"no team is named {name!r}")

    def audit(self, limit: int) -> Deferred[list]:
        """The last C{limit} changes, newest first."""
        return self._store.audit(limit).addErrback(self._unavailable)

    # -- changing

    def _in_gateway_ini(self, kind: str, name: str) -> bool:
        """gateway.ini (or its keys file) has the C{kind} (C{key} or C{team}) named C{name}: it is read-only here."""
        config = self._configured()
        return any(key.name == name for key in config.auth.keys) if kind == "key" else name in config.teams

    def _taken(self, name: str) -> bool:
        return name in self.registry.keys or self._in_gateway_ini("key", name)

    def _team_exists(self, name: str | None) -> bool:
        return name is None or name in self.registry.teams or name in self._configured().teams

    def _read_only(self, kind: str, name: str) -> GatewayError:
        return GatewayError(errors.CONFLICT, f"the {kind} {name!r} is gateway.ini's: change it there (and send SIGHUP)")

    @_once_more_if_moved
    async def create_key(self, body: Any, actor: str) -> dict:
        """
        A new key from C{body} (C{name} and fields); its secret, made here, is
        in the answer once (C{secret}) and kept only as its digest.

        @raise GatewayError: C{bad_request} naming the field, C{conflict}: the name is taken.
        """
        try:
            name = checked_name(_object(body).get("name"))
            fields = checked_fields(body, KEY_FIELDS, allowed_extra=("name", "disabled"))
            disabled = _disabled(body.get("disabled", False))
        except AdminInputError as error:
            raise _bad(error) from None
        if self._taken(name):
            raise GatewayError(errors.CONFLICT, f"a key named {name!r} exists already")
        self._check_team(fields)
        secret = new_secret()
        now = self._clock.seconds()
        record = {"name": name, "secret_sha256": digest_hex(secret), "fields": fields, "disabled": disabled,
                  "retired": [], "created_at": now, "updated_at": now}
        await self._commit("key", name, None, record, "create", actor)
        return {**public_key(record), "secret": secret}

    def _check_team(self, fields: dict) -> None:
        team = fields.get("team")
        if not self._team_exists(team):
            raise GatewayError(errors.BAD_REQUEST, f"team: no team is named {team!r}")

    @_once_more_if_moved
    async def change_key(self, name: str, body: Any, actor: str) -> dict:
        """
        C{body}'s fields (and C{disabled}) set on the key named C{name}.

        @raise GatewayError: C{not_found}, C{conflict} (a key of gateway.ini), C{bad_request}.
        """
        before = self._admin_record("key", name)
        try:
            fields = checked_fields(_object(body), KEY_FIELDS, allowed_extra=("disabled",))
            disabled = _disabled(body["disabled"]) if "disabled" in body else before.get("disabled", False)
        except AdminInputError as error:
            raise _bad(error) from None
        self._check_team(fields)
        record = {**before, "fields": {**before["fields"], **fields}, "disabled": disabled, "updated_at": self._clock.seconds()}
        await self._commit("key", name, before, record, "change", actor)
        return public_key(record)

    @_once_more_if_moved
    async def rotate_key(self, name: str, body: Any, actor: str) -> dict:
        """
        A new secret for the key named C{name} (in the answer once); the old
        one stays valid for C{grace_seconds} (default L{DEFAULT_GRACE}; 0: not
        at all), said in the answer.

        @raise GatewayError: C{not_found}, C{conflict}, C{bad_request} (C{grace_seconds}).
        """
        before = self._admin_record("key", name)
        body = {} if body is None else body
        grace = _object(body).get("grace_seconds", DEFAULT_GRACE)
        unknown = set(body) - {"grace_seconds"}
        if unknown:
            raise GatewayError(errors.BAD_REQUEST, f"{sorted(unknown)[0]}: no such field; the field is grace_seconds")
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace <= MOST_GRACE:
            raise GatewayError(errors.BAD_REQUEST, f"grace_seconds: expected seconds from 0 to {int(MOST_GRACE)}; got {grace!r}")
        now = self._clock.seconds()
        secret = new_secret()
        retired = [old for old in before.get("retired", []) if old["until"] > now]
        if grace > 0:
            retired.append({"secret_sha256": before["secret_sha256"], "until": now + grace})
        record = {**before, "secret_sha256": digest_hex(secret), "retired": retired, "updated_at": now}
        await self._commit("key", name, before, record, "rotate", actor)
        return {**public_key(record), "secret": secret, "grace_seconds": grace,
                "previous_secret_valid_until": now + grace if grace > 0 else None}

    @_once_more_if_moved
    async def delete_key(self, name: str, actor: str) -> dict:
        """
        @raise GatewayError: C{not_found}, C{conflict} (a key of gateway.ini).
        """
        before = self._admin_record("key", name)
        await self._commit("key", name, before, None, "delete", actor)
        return {"name": name, "deleted": True}

    @_once_more_if_moved
    async def create_team(self, body: Any, actor: str) -> dict:
        """
        A new team from C{body} (C{name} and fields).

        @raise GatewayError: C{bad_request} naming the field, C{conflict}.
        """
        try:
            name = checked_name(_object(body).get("name"))
            fields = checked_fields(body, TEAM_FIELDS, allowed_extra=("name",))
        except AdminInputError as error:
            raise _bad(error) from None
        if name in self.registry.teams or self._in_gateway_ini("team", name):
            raise GatewayError(errors.CONFLICT, f"a team named {name!r} exists already")
        now = self._clock.seconds()
        record = {"name": name, "fields": fields, "created_at": now, "updated_at": now}
        await self._commit("team", name, None, record, "create", actor)
        return public_team(record)

    @_once_more_if_moved
    async def change_team(self, name: str, body: Any, actor: str) -> dict:
        """
        @raise GatewayError: C{not_found}, C{conflict}, C{bad_request}.
        """
        before = self._admin_record("team", name)
        try:
            fields = checked_fields(_object(body), TEAM_FIELDS)
        except AdminInputError as error:
            raise _bad(error) from None
        record = {**before, "fields": {**before["fields"], **fields}, "updated_at": self._clock.seconds()}
        await self._commit("team", name, before, record, "change", actor)
        return public_team(record)

    @_once_more_if_moved
    async def delete_team(self, name: str, actor: str) -> dict:
        """
        @raise GatewayError: C{not_found}, C{conflict} (gateway.ini's, or a key still names it).
        """
        before = self._admin_record("team", name)
        users = sorted(key_name for key_name, record in self.registry.keys.items() if record["fields"].get("team") == name)
        if users:
            raise GatewayError(errors.CONFLICT, f"the team {name!r} is still named by the key {users[0]!r}: change or delete it first")
        await self._commit("team", name, before, None, "delete", actor)
        return {"name": name, "deleted": True}

    def _admin_record(self, kind: str, name: str) -> dict:
        """The admin API's record of C{kind} named C{name}; L{GatewayError} when there is none, or gateway.ini's."""
        records = self.registry.keys if kind == "key" else self.registry.teams
        record = records.get(name)
        if record is not None:
            return record
        if self._in_gateway_ini(kind, name):
            raise self._read_only(kind, name)
        raise GatewayError(errors.NOT_FOUND, f"no {kind} is named {name!r}")

    async def _commit(self, kind: str, name: str, before: dict | None, after: dict | None, action: str, actor: str) -> None:
        public = public_key if kind == "key" else public_team
        entry = {
            "time": self._clock.seconds(), "actor": actor, "action": action, "kind": kind, "name": name,
            "before": public(before) if before is not None else None, "after": public(after) if after is not None else None,
        }
        try:
            version = await self._store.commit(kind, name, before, after, entry)
        except AdminStoreFailed as error:
            raise GatewayError(errors.ADMIN_UNAVAILABLE, f"{error}; nothing was changed") from None
        self._log.info("admin_changed", actor=actor, action=action, kind=kind, name=name, version=version)
        try:
            await self._reload()  # served here at once; elsewhere at the next look at the version
        except AdminStoreFailed:
            pass  # the next look tries again

    @staticmethod
    def _unavailable(failure: Any) -> Any:
        if failure.check(AdminStoreFailed):
            raise GatewayError(errors.ADMIN_UNAVAILABLE, failure.getErrorMessage())
        return failure


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise GatewayError(errors.BAD_REQUEST, "the body must be a JSON object")
    return body


def _disabled(value: Any) -> bool:
    if not isinstance(value, bool):
        raise AdminInputError("disabled", f"expected true or false; got {value!r}")
    return value
