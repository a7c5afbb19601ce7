"""Hot swap: the server follows a model source (a registry alias) without restarting.

When the source points somewhere new (polled, or on POST /admin/reload) the new version is
checked (hashes) and loaded beside the old one, new requests go to it, requests in flight finish
on the old one (each holds the Service it started on), and the old one is closed and freed when
the last of them ends. A load that fails leaves the old version serving; the failure is counted
and reported. After a swap, an optional policy ([rollback]) watches the new version's requests
and moves the source back when its error rate, safety-block rate or p99 latency passes a limit.

The server knows sources only through the ModelSource protocol, so it does not import the
registry (the CLI builds a registry alias source and hands it over).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hybridlm.errors import UserError

if TYPE_CHECKING:
    from hybridlm.serve.config import RollbackSettings, ServerSettings
    from hybridlm.serve.monitoring import Metrics, RequestRecord
    from hybridlm.serve.service import Service

log = logging.getLogger("hybridlm.serve")


class ModelSource(Protocol):
    """Where the served model comes from."""

    follows: bool
    """Whether it can move (then the server polls it)."""
    name: str
    """The model id clients send (unless server.model_name says otherwise)."""

    def current(self) -> tuple[str, Path]:
        """(version label, run directory) it points at now; UserError when it cannot say."""

    def check(self, label: str, run_dir: Path) -> None:
        """Refuse (UserError) a version whose files changed since it was recorded."""

    def roll_back(self, label: str, reason: str) -> str:
        """Point back from version `label` to the one before it (the automated policy); returns
        the label it now points at. UserError when it no longer points at `label`."""


@dataclass(frozen=True)
class FixedRun:
    """One run directory, served as it is (`hybridlm serve --model RUN_DIR`)."""

    run_dir: Path
    follows: bool = False

    @property
    def name(self) -> str:
        return Path(self.run_dir).name

    def current(self) -> tuple[str, Path]:
        return Path(self.run_dir).name, Path(self.run_dir)

    def check(self, label: str, run_dir: Path) -> None:
        """Nothing beyond what loading does: load_run checks the manifest's hashes as it reads."""

    def roll_back(self, label: str, reason: str) -> str:
        raise UserError("a run directory has no earlier version; serve a registry alias (models:/NAME@ALIAS)")


@dataclass
class _Watch:
    """A new version's requests since the swap, for the rollback policy."""

    version: str
    started: float = field(default_factory=time.monotonic)
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    blocked: int = 0


class Swapper:
    """Keeps `state.service` on the source's current version (see the module docstring)."""

    def __init__(self, source: ModelSource, server: ServerSettings, policy: RollbackSettings, metrics: Metrics,
                 service: Service) -> None:
        self.source, self.server, self.policy, self.metrics = source, server, policy, metrics
        self.service = service
        self.last_error = ""
        self._lock = asyncio.Lock()
        self._watch: _Watch | None = None
        self._retiring: dict[asyncio.Future, Service] = {}
        self._background: set[asyncio.Future] = set()
        metrics.model_version.info({"version": service.version})

    async def refresh(self) -> dict:
        """Swap to the source's current version if it moved; {"swapped", "version", ...}. Raises
        UserError (the old version keeps serving) when the new one cannot be loaded."""
        async with self._lock:
            try:
                label, run_dir = await asyncio.to_thread(self.source.current)
                if label == self.service.version:
                    return {"swapped": False, "version": label}
                return await self._swap_to(label, run_dir)
            except Exception as exc:
                self.last_error = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
                self.metrics.swaps.labels("failed").inc()
                log.error("model swap failed, %s keeps serving: %s", self.service.version, self.last_error)
                raise UserError(f"could not load the new version; {self.service.version} keeps serving: "
                                f"{self.last_error}") from None

    async def _swap_to(self, label: str, run_dir: Path) -> dict:
        from hybridlm.serve.service import Service

        started = time.perf_counter()
        await asyncio.to_thread(self.source.check, label, run_dir)
        new = await asyncio.to_thread(Service.from_settings, run_dir, self.server)
        new.version = label
        await new.start()
        old, self.service = self.service, new  # new requests take the new one from here on
        self.last_error = ""
        task = asyncio.ensure_future(old.retire())  # closes once its in-flight requests are done
        self._retiring[task] = old
        task.add_done_callback(lambda done: self._retiring.pop(done, None))
        self.metrics.swaps.labels("ok").inc()
        self.metrics.model_version.info({"version": label})
        self._watch = _Watch(label) if self.policy.enabled else None
        log.info("now serving %s (was %s)", label, old.version)
        return {"swapped": True, "version": label, "previous": old.version, "seconds": time.perf_counter() - started}

    async def poll(self) -> None:
        """Follow the source every server.alias_poll_s seconds (a failed load is retried next time)."""
        while True:
            await asyncio.sleep(self.server.alias_poll_s)
            try:
                await self.refresh()
            except UserError:
                pass  # logged and counted in refresh; the old version serves on

    def observe(self, record: RequestRecord) -> None:
        """One finished generation request; may start an automated rollback."""
        watch = self._watch
        if watch is None or record.model_version != watch.version:
            return
        if time.monotonic() - watch.started > self.policy.window_s:
            self._watch = None  # the window passed: the version stays
            return
        watch.latencies.append(record.duration_s or 0.0)
        # What the version did: server errors (not 503, a full queue is load) and replies the output
        # filter blocked (a blocked prompt says nothing about the model).
        watch.errors += (record.status >= 500 and record.status != 503) or record.error_code == "internal_error"
        watch.blocked += any(hit.startswith("output:") and hit.endswith(":block") for hit in record.filter_hits)
        reason = self._breach(watch)
        if reason:
            self._watch = None
            task = asyncio.ensure_future(self._roll_back(watch.version, reason))
            self._background.add(task)  # referenced until it ends (a bare task may be collected mid-way)
            task.add_done_callback(self._background.discard)

    def _breach(self, watch: _Watch) -> str:
        count, policy = len(watch.latencies), self.policy
        if count < policy.min_requests:
            return ""
        if policy.max_error_rate and watch.errors / count > policy.max_error_rate:
            return f"error rate {watch.errors / count:.0%} over {count} requests above {policy.max_error_rate:.0%}"
        if policy.max_block_rate and watch.blocked / count > policy.max_block_rate:
            return (f"safety-filter block rate {watch.blocked / count:.0%} over {count} requests above "
                    f"{policy.max_block_rate:.0%}")
        p99 = sorted(watch.latencies)[min(count - 1, int(0.99 * count))]
        if policy.max_p99_s and p99 > policy.max_p99_s:
            return f"p99 latency {p99:.3f} s over {count} requests above {policy.max_p99_s} s"
        return ""

    async def _roll_back(self, version: str, reason: str) -> None:
        try:
            back = await asyncio.to_thread(self.source.roll_back, version, reason)
            self.metrics.rollbacks.inc()
            log.warning("automated rollback of %s (%s) to %s", version, reason, back)
            await self.refresh()
            self._watch = None  # the version rolled back to served before: it is not on trial
        except Exception as exc:  # noqa: BLE001 - a registry that cannot be reached must not end silently
            log.error("automated rollback of %s failed: %s", version, exc)

    async def close(self, grace_s: float = 10.0) -> None:
        """At shutdown: retiring versions get `grace_s` for their requests, then close regardless."""
        for task in self._background:
            task.cancel()
        if self._retiring:
            _, late = await asyncio.wait(list(self._retiring), timeout=grace_s)
            for task in late:
                task.cancel()
                await self._retiring[task].close()
        await self.service.close()
