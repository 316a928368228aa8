"""``redis://host:port/db`` and ``rediss://`` (TLS): a Redis server shared by all replicas.

Redis holds everything in memory: give it a ``maxmemory`` and ``maxmemory-policy allkeys-lru``
(or ``volatile-lru`` with an embedding TTL) so that it evicts instead of refusing writes.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis

from sam2_shared.store.base import BlobStore, mask_url

# Query parameters this module reads itself; the rest go to redis-py's URL parser
# (socket_timeout, ssl_cert_reqs, ...), which overrides the defaults below.
_OWN_PARAMS = ("prefix",)


# Compare-and-set in one server-side step: KEYS[1] becomes ARGV[2] (with a PX of ARGV[3]
# milliseconds, none when 0) only if it holds exactly ARGV[1].
_REPLACE_IF = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
"""


class RedisBlobStore(BlobStore):
    """Values as Redis strings; TTL via ``PX``; one connection pool per store.

    Arguments:
        url (str): ``redis://[user:password@]host:port/db[?prefix=...&socket_timeout=...]``.
        socket_timeout_s (float): per-command timeout (an 8 MiB value moves in milliseconds).
        connect_timeout_s (float): TCP connect timeout.
        max_connections (int): pool size, at least the number of threads using the store.
    """

    def __init__(
        self,
        url: str,
        *,
        socket_timeout_s: float = 5.0,
        connect_timeout_s: float = 2.0,
        max_connections: int = 64,
    ) -> None:
        self.url = mask_url(url)
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        own = {key: value for key, value in query if key in _OWN_PARAMS}
        self.key_prefix = own.get("prefix", "")
        client_url = urlunsplit(parts._replace(
            query=urlencode([(k, v) for k, v in query if k not in _OWN_PARAMS])))
        pool = redis.ConnectionPool.from_url(
            client_url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            max_connections=max_connections,
            health_check_interval=30,
        )
        if pool.connection_kwargs.get("decode_responses"):
            raise ValueError("the embedding store needs raw bytes: drop decode_responses")
        self.client = redis.Redis(connection_pool=pool)

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get(self.key_prefix + key)
        except redis.RedisError as exc:
            raise self.unavailable(f"GET {key}", exc) from exc

    def put(self, key: str, data: bytes, ttl_s: float | None = None) -> None:
        try:
            self.client.set(self.key_prefix + key, data, px=_ttl_ms(ttl_s))
        except redis.RedisError as exc:
            raise self.unavailable(f"SET {key}", exc) from exc

    def put_if_absent(self, key: str, data: bytes, ttl_s: float | None = None) -> bool:
        try:
            return bool(self.client.set(self.key_prefix + key, data, px=_ttl_ms(ttl_s), nx=True))
        except redis.RedisError as exc:
            raise self.unavailable(f"SET NX {key}", exc) from exc

    def replace_if(self, key: str, expected: bytes, data: bytes,
                   ttl_s: float | None = None) -> bool:
        try:
            return bool(self.client.eval(_REPLACE_IF, 1, self.key_prefix + key, expected, data,
                                         _ttl_ms(ttl_s) or 0))
        except redis.RedisError as exc:
            raise self.unavailable(f"replace {key}", exc) from exc

    def delete(self, key: str) -> None:
        try:
            self.client.delete(self.key_prefix + key)
        except redis.RedisError as exc:
            raise self.unavailable(f"DEL {key}", exc) from exc

    def exists(self, key: str) -> bool:
        try:
            return bool(self.client.exists(self.key_prefix + key))
        except redis.RedisError as exc:
            raise self.unavailable(f"EXISTS {key}", exc) from exc

    def ping(self) -> None:
        try:
            self.client.ping()
        except redis.RedisError as exc:
            raise self.unavailable("PING", exc) from exc

    def close(self) -> None:
        self.client.close()
        self.client.connection_pool.disconnect()


def _ttl_ms(ttl_s: float | None) -> int | None:
    # Redis wants a positive integer; a sub-millisecond TTL still expires at once-ish.
    return None if ttl_s is None else max(1, round(ttl_s * 1000))
