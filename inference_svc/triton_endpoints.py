"""The Triton servers a TritonEngine may use, as they come and go.

A URL is either a fixed `host:port` or `dns:///name:port`: a name that resolves to every Triton
pod (a Kubernetes headless Service). Names are resolved again every `every_s` seconds; an address
that appears gets a client, one that is gone gets none for new streams (its client closes once its
last stream ends), and an address whose server does not say it is ready (starting, draining on
SIGTERM) is skipped until it does. So a vanished or draining Triton is avoided within seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import tritonclient.grpc.aio as triton
from tritonclient.utils import InferenceServerException

log = logging.getLogger(__name__)

Resolve = Callable[[str, int], Awaitable[list[str]]]


async def resolve_dns(host: str, port: int) -> list[str]:
    """Every address host resolves to, as sorted `address:port` strings (IPv6 in brackets)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({f"[{i[4][0]}]:{port}" if i[0] == socket.AF_INET6 else f"{i[4][0]}:{port}" for i in infos})


@dataclass(eq=False)
class Endpoint:
    url: str
    client: triton.InferenceServerClient
    in_flight: int = 0
    #: the server said it is ready when last asked (fixed URLs are always tried)
    ready: bool = True
    #: no longer among the resolved addresses: no new streams; closed once idle
    gone: bool = False


class Endpoints:
    def __init__(self, urls: Sequence[str], channel_args, every_s: float = 2.0, resolve: Resolve = resolve_dns) -> None:
        self._channel_args = channel_args
        self._every_s = every_s
        self._resolve = resolve
        self._names = [u.removeprefix("dns:///").rsplit(":", 1) for u in urls if u.startswith("dns:///")]
        self._fixed = frozenset(u for u in urls if not u.startswith("dns:///"))
        self._all: dict[str, Endpoint] = {u: self._endpoint(u) for u in self._fixed}
        self._task: asyncio.Task | None = None
        self._closing: set[asyncio.Task] = set()
        self._first = asyncio.Event()
        if not self._names:
            self._first.set()

    def _endpoint(self, url: str) -> Endpoint:
        return Endpoint(url, triton.InferenceServerClient(url, channel_args=self._channel_args))

    async def usable(self) -> list[Endpoint]:
        """The endpoints new streams may use, least busy first."""
        if self._names and self._task is None:
            self._task = asyncio.create_task(self._watch())
        if not self._first.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._first.wait()
        return sorted((e for e in self._all.values() if e.ready and not e.gone), key=lambda e: e.in_flight)

    def released(self, endpoint: Endpoint) -> None:
        """A stream on endpoint ended: a gone endpoint's client closes with its last one."""
        if endpoint.gone and not endpoint.in_flight and self._all.get(endpoint.url) is endpoint:
            del self._all[endpoint.url]
            task = asyncio.get_running_loop().create_task(endpoint.client.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def refresh(self) -> None:
        """Resolves the names once and asks each resolved server whether it is ready."""
        found: set[str] = set()
        for host, port in self._names:
            try:
                found.update(await self._resolve(host, int(port)))
            except OSError as error:
                log.warning("cannot resolve Triton's name %s: %s (keeping the last addresses)", host, error)
                found.update(u for u, e in self._all.items() if not e.gone and u not in self._fixed)
        for url in found - set(self._all):
            log.info("triton endpoint %s appeared", url)
            self._all[url] = self._endpoint(url)
        for url, endpoint in list(self._all.items()):
            if url in self._fixed:
                continue
            if url not in found:
                if not endpoint.gone:
                    log.info("triton endpoint %s is gone", url)
                endpoint.gone = True
                self.released(endpoint)
                continue
            endpoint.gone = False
            endpoint.ready = await self._ready(endpoint)
        self._first.set()

    @staticmethod
    async def _ready(endpoint: Endpoint) -> bool:
        try:
            return bool(await endpoint.client.is_server_ready(client_timeout=1))
        except (InferenceServerException, grpc.aio.AioRpcError):
            return False

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as error:  # noqa: BLE001 - discovery must not die; the next tick retries
                log.error("refreshing Triton's endpoints failed: %s", error)
            await asyncio.sleep(self._every_s)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for endpoint in list(self._all.values()):
            await endpoint.client.close()
        if self._closing:
            await asyncio.wait(set(self._closing))
