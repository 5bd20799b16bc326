"""A cluster's etcd, spoken to through etcd's v3 API, from inside a network namespace.

The client library is etcd3gw (OpenStack's client of etcd's grpc-gateway, the JSON form of the
v3 API that etcd serves on its client port). Chosen over the alternatives PyPI offers:
- etcd3gw: maintained (2.7.0, 2026), synchronous, small (requests), and its raw `transaction`
  takes any v3 TxnRequest, so compares on create or mod revision, lease-bound puts, range
  reads with a revision, lease grant / keep-alive / time-to-live and watches from a revision
  are all there. netsim is synchronous and threaded, which is what it fits.
- aetcd and etcd3aio: maintained gRPC clients, but asyncio only: every caller here (apply, the
  CNI plugin, the node agents' threads) would need an event loop of its own.
- etcd3 (python-etcd3): no release since 2020 and pinned to an old protobuf; its forks
  (etcd-sdk-python, etcd3-fc ...) are single-maintainer copies of it.
The gateway costs a JSON encoding per request, measured well inside the figures netsim keeps
(a range read of 10,000 pods is one request).

Sockets belong to the namespace of the thread that opens them, so every request is made with
the thread inside the namespace the store is reached from (a node's, or the control plane's):
the host's own namespace never gets a route to an emulated address.
"""

from __future__ import annotations

import base64
import collections
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec

from netsim.errors import NetsimError
from netsim.kernel import netns as nsmod

_decode = msgspec.json.Decoder().decode  # values are JSON: a 10,000-pod listing decodes 4x faster

CLIENT_PORT = 2379
MAX_TXN_OPS = 128  # etcd's default --max-txn-ops: a user's etcd may keep it


class StoreError(NetsimError):
    """The store could not be reached or refused a request: one line naming the endpoint."""


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def prefix_end(prefix: str) -> str:
    """The range end that makes a range read or delete cover every key under `prefix`."""
    raw = prefix.encode()
    return _b64(raw[:-1] + bytes([raw[-1] + 1]))


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0

    def json(self):
        return _decode(self.value)


@dataclass(frozen=True)
class Event:
    """One change a watch saw: PUT (created or changed) or DELETE (deleted, or its lease
    ended); a DELETE's kv holds the key and the revision of the delete."""

    type: str
    kv: KeyValue


class Compacted(NetsimError):
    """The revision a watch asked for is gone from etcd's history: list again."""


class Store:
    """One cluster's etcd: its client URLs and the namespace they are reached from."""

    def __init__(
        self,
        endpoints: Iterable[str],
        netns: str | None = None,
        timeout: float = 5.0,
        fix: str = "start it, or fix spec.datastore.etcd.endpoints",
        answer: float = 30.0,
    ):
        self.endpoints = list(endpoints)
        self.netns = netns
        self.timeout = timeout  # to connect: an etcd that is not there is told at once
        self.answer = answer  # to answer: a loaded etcd on two cores can take seconds
        self.fix = fix  # what an unreachable store's message tells the user to do
        self._local = threading.local()  # one connection pool per thread
        self.writes: dict[str, int] = {}  # key -> revision of this client's last write of it

    def __repr__(self) -> str:
        return f"etcd at {', '.join(self.endpoints)}"

    # -- transport -----------------------------------------------------------------------------

    def _client(self, endpoint: str):
        clients = getattr(self._local, "clients", None)
        if clients is None:
            clients = self._local.clients = {}
        if endpoint not in clients:
            import etcd3gw

            url = urlsplit(endpoint)
            clients[endpoint] = etcd3gw.Etcd3Client(
                host=url.hostname,
                port=url.port or CLIENT_PORT,
                protocol=url.scheme or "http",
                timeout=(self.timeout, self.answer),
                api_path="/v3/",
            )
        return clients[endpoint]

    def call(self, path: str, body: dict) -> dict:
        """POST one v3 request (`kv/range`, `kv/txn`, `lease/grant` ...) to the first endpoint
        that answers."""
        from etcd3gw import exceptions

        problems = []
        for endpoint in self.endpoints:
            client = self._client(endpoint)
            try:
                with nsmod.entered(self.netns):
                    return client.post(client.get_url(path), data=json.dumps(body))
            except (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError) as exc:
                problems.append(f"{endpoint}: {_reason(exc)}")
            except exceptions.Etcd3Exception as exc:
                raise StoreError(f"etcd at {endpoint} refused {path}: {_reason(exc)}") from None
        where = f" from netns {self.netns}" if self.netns else ""
        raise StoreError(f"etcd is not reachable{where} ({'; '.join(problems)}): {self.fix}")

    # -- keys ----------------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        found = self.range(key)
        return found[0] if found else None

    def range(self, key: str, prefix: bool = False, keys_only: bool = False) -> list[KeyValue]:
        """The key, or every key under the prefix, in key order (with empty values if
        keys_only)."""
        body = range_op(key, prefix, keys_only)["request_range"]
        return [_kv(item) for item in self.call("kv/range", body).get("kvs", [])]

    def list(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under the prefix and the revision they were read at (where a watch
        goes on from: client-go's list, then watch)."""
        result = self.call("kv/range", range_op(prefix, True)["request_range"])
        return int(result["header"]["revision"]), [_kv(i) for i in result.get("kvs", [])]

    def watch(
        self,
        prefix: str,
        start_revision: int,
        handle: Callable[[int, list[Event]], None],
        stopped: threading.Event,
    ) -> None:
        """Stream every change under the prefix from start_revision on: handle(revision,
        events) per watch response, in revision order, until `stopped` is set (checked between
        responses) or the stream breaks (StoreError: list again, then watch again). A revision
        etcd has compacted away raises Compacted."""
        import requests

        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": prefix_end(prefix),
                "start_revision": start_revision,
            }
        }
        endpoint = self.endpoints[0]
        client = self._client(endpoint)
        try:
            with nsmod.entered(self.netns):  # the stream's socket stays in this namespace
                response = client.session.post(
                    client.get_url("watch"), json=body, stream=True, timeout=(self.timeout, None)
                )
            with response:
                for line in _lines(response.iter_content(chunk_size=READ_SIZE)):
                    if stopped.is_set():
                        return
                    if not line.strip():
                        continue
                    result = json.loads(line).get("result", {})
                    del line  # (a watch waits with nothing of the last response held)
                    if int(result.get("compact_revision", 0)):
                        raise Compacted(int(result["compact_revision"]))
                    if result.get("canceled"):
                        raise StoreError(f"etcd at {endpoint} ended the watch of {prefix}")
                    events = [
                        Event(e.get("type", "PUT"), _kv(e["kv"])) for e in result.get("events", [])
                    ]
                    revision = int(result.get("header", {}).get("revision", 0))
                    del result
                    if events:
                        handle(revision, events)
                        del events
                        if stopped.is_set():
                            return
        except requests.RequestException as exc:
            raise StoreError(f"etcd at {endpoint}: watch of {prefix} broke ({exc})") from None
        if not stopped.is_set():
            raise StoreError(f"etcd at {endpoint} closed the watch of {prefix}")

    def get_many(self, keys: list[str]) -> dict[str, KeyValue | None]:
        """Several keys (None where absent), one request (one revision) per MAX_TXN_OPS keys."""
        found: dict[str, KeyValue | None] = dict.fromkeys(keys)
        for start in range(0, len(keys), MAX_TXN_OPS):
            result = self.txn([], [range_op(k) for k in keys[start : start + MAX_TXN_OPS]])
            for kv in ranged(result):
                found[kv.key] = kv
        return found

    def revision(self) -> int:
        """The store's current revision."""
        return int(self.call("kv/range", {"key": _b64("\0"), "limit": 1})["header"]["revision"])

    def put(self, key: str, value: str | bytes, lease: int = 0) -> int:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        revision = int(self.call("kv/put", body)["header"]["revision"])
        self.writes[key] = revision
        return revision

    def written(self, prefix: str) -> int:
        """The revision of this client's last write under the prefix (0: none): what a node
        that watches the prefix must have seen to have applied it."""
        return self.written_under([prefix])[prefix]

    def written_under(self, prefixes: list[str]) -> dict[str, int]:
        """written() of each prefix (none inside another), in one pass over the writes."""
        import bisect

        ordered = sorted(prefixes)
        found = dict.fromkeys(prefixes, 0)
        for key, revision in self.writes.items():
            at = bisect.bisect_right(ordered, key) - 1
            if at >= 0 and key.startswith(ordered[at]) and revision > found[ordered[at]]:
                found[ordered[at]] = revision
        return found

    def put_all(self, items: dict[str, str | bytes]) -> None:
        """Many keys, in transactions of at most MAX_TXN_OPS puts each."""
        ops = [put_op(k, v) for k, v in items.items()]
        for start in range(0, len(ops), MAX_TXN_OPS):
            self.txn([], ops[start : start + MAX_TXN_OPS])

    def create(self, key: str, value: str | bytes, lease: int = 0) -> bool:
        """Put the key only if it does not exist (flannel's and Calico's way to claim)."""
        return self.txn([absent(key)], [put_op(key, value, lease)])["succeeded"]

    def take(self, key: str, value: str, lease: int, mine: Callable[[KeyValue], bool]) -> bool:
        """Put the key under the lease if it is absent, or if what it holds is `mine` and
        unchanged since read (flanneld's create, then its take-over of its own lease); False
        if someone else holds it."""
        if self.create(key, value, lease):
            return True
        current = self.get(key)
        put = [put_op(key, value, lease)]
        return bool(current and mine(current) and self.txn([unchanged(current)], put)["succeeded"])

    def delete(self, key: str, prefix: bool = False) -> int:
        body: dict = {"key": _b64(key)}
        if prefix:
            body["range_end"] = prefix_end(key)
        result = self.call("kv/deleterange", body)
        deleted = int(result.get("deleted", 0))
        if deleted:  # a delete of nothing makes no revision, and no watch sees it
            self.writes[key] = int(result["header"]["revision"])
        return deleted

    def delete_all(self, keys: list[str]) -> None:
        ops = [delete_op(k) for k in keys]
        for start in range(0, len(ops), MAX_TXN_OPS):
            self.txn([], ops[start : start + MAX_TXN_OPS])

    def txn(self, compare: list[dict], success: list[dict], failure: list[dict] = ()) -> dict:
        """One v3 transaction; `succeeded` tells which branch ran."""
        result = self.call("kv/txn", {"compare": compare, "success": success, "failure": failure})
        result["succeeded"] = bool(result.get("succeeded", False))
        revision = int(result["header"]["revision"])
        ops = success if result["succeeded"] else failure
        for op, response in zip(ops, result.get("responses", []), strict=False):
            # a delete of nothing makes no revision, and no watch sees it
            done = "request_put" in op or int(
                response.get("response_delete_range", {}).get("deleted", 0)
            )
            change = op.get("request_put") or op.get("request_delete_range")
            if change is not None and done:
                self.writes[_unb64(change["key"]).decode()] = revision
        return result

    # -- leases --------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        return int(self.call("lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def keep_alive(self, lease: int) -> int:
        """Renew the lease once; its remaining TTL (0: it had already expired)."""
        result = self.call("lease/keepalive", {"ID": str(lease)})
        return int(result.get("result", result).get("TTL", 0))

    def time_to_live(self, lease: int) -> tuple[int, int]:
        """(remaining, granted) seconds; remaining is -1 for a lease that is gone."""
        result = self.call("kv/lease/timetolive", {"ID": str(lease)})
        return int(result.get("TTL", -1)), int(result.get("grantedTTL", 0))

    def revoke(self, lease: int) -> None:
        """End the lease and its keys; one that has already ended is fine."""
        try:
            self.call("kv/lease/revoke", {"ID": str(lease)})
        except StoreError as exc:
            if "not found" not in str(exc):
                raise


def put_op(key: str, value: str | bytes, lease: int = 0) -> dict:
    op = {"key": _b64(key), "value": _b64(value)}
    if lease:
        op["lease"] = str(lease)
    return {"request_put": op}


def delete_op(key: str) -> dict:
    return {"request_delete_range": {"key": _b64(key)}}


def range_op(key: str, prefix: bool = False, keys_only: bool = False) -> dict:
    op: dict = {"key": _b64(key)}
    if prefix:
        op["range_end"] = prefix_end(key)
    if keys_only:
        op["keys_only"] = True
    return {"request_range": op}


def ranged(result: dict) -> list[KeyValue]:
    """Every key a transaction's range operations returned, in order."""
    return [
        _kv(item)
        for response in result.get("responses", [])
        for item in response.get("response_range", {}).get("kvs", [])
    ]


def absent(key: str) -> dict:
    """A compare that holds while the key does not exist."""
    return {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}


def unchanged(kv: KeyValue) -> dict:
    """A compare that holds while the key is as it was read."""
    return {
        "key": _b64(kv.key),
        "result": "EQUAL",
        "target": "MOD",
        "mod_revision": kv.mod_revision,
    }


def _kv(item: dict) -> KeyValue:
    return KeyValue(
        _unb64(item["key"]).decode(),
        _unb64(item.get("value", "")),
        int(item.get("mod_revision", 0)),
        int(item.get("create_revision", 0)),
        int(item.get("lease", 0)),
    )


def _reason(exc: Exception) -> str:
    parts = [getattr(exc, "detail_text", None), *exc.args]
    text = " ".join(str(a) for a in parts if a) or type(exc).__name__
    try:
        return json.loads(exc.args[0]).get("error", text)
    except (ValueError, TypeError, AttributeError, IndexError):
        pass
    for marker in ("Connection refused", "timed out", "No route to host", "Network is unreachable"):
        if marker in text:
            return marker
    return text.splitlines()[0][:200]


READ_SIZE = 65536


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The lines of a stream read in pieces, holding none it has given out while it waits for
    the next piece: requests' iter_lines keeps the last piece and its lines, and a watch
    response of an Endpoints object of 10,000 addresses is megabytes, held by every node's
    agent between changes."""
    parts: list[bytes] = []
    for chunk in chunks:
        pieces = chunk.split(b"\n")
        del chunk
        parts.append(pieces[0])
        if len(pieces) == 1:
            continue
        ready = collections.deque([b"".join(parts), *pieces[1:-1]])
        parts = [pieces[-1]] if pieces[-1] else []
        del pieces
        while ready:
            yield ready.popleft()
    if parts:
        yield b"".join(parts)
