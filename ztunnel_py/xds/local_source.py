"""The local control plane: ``LOCAL_XDS_PATH`` (watched) or inline ``LOCAL_XDS``.

The file is loaded at start (a bad file stops the daemon before it serves, as ztunnel does)
and then watched: when it changes it is parsed again, and a bad version is refused with the
path of the offending field while the last good state stays in place. Whatever the file holds,
the watcher can only refuse it: every failure of reading or parsing (limits in
``xds/yaml_load.py``) is logged, kept in ``last_error`` for ``/config_dump``, and the watch goes
on. Reloads read and parse in a worker thread, so a large file never stalls the proxy, the
admin port or readiness; only applying the finished batch runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from ztunnel_py.errors import LocalConfigError, truncate
from ztunnel_py.state.model import DEFAULT_CLUSTER_ID
from ztunnel_py.state.store import ChangeSet, UpdateBatch
from ztunnel_py.xds.local import load_local_config_file, parse_local_config

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0


class LocalConfigSource:
    def __init__(
        self,
        apply: Callable[[UpdateBatch], ChangeSet],
        *,
        path: Path | None = None,
        inline: str | None = None,
        cluster_id: str = DEFAULT_CLUSTER_ID,
    ) -> None:
        if (path is None) == (inline is None):
            raise ValueError("exactly one of path or inline")
        self._apply = apply
        self._path = path
        self._inline = inline
        self._cluster_id = cluster_id
        self._stamp: tuple[int, int] | None = None
        self.loads = 0
        self.failures = 0
        self.last_error: str | None = None

    def _parse(self) -> UpdateBatch:
        if self._inline is not None:
            return parse_local_config(self._inline, source="LOCAL_XDS", cluster_id=self._cluster_id)
        assert self._path is not None
        self._stamp = self._file_stamp()
        return load_local_config_file(self._path, cluster_id=self._cluster_id)

    def _applied(self, batch: UpdateBatch) -> ChangeSet:
        changes = self._apply(batch)
        self.loads += 1
        self.last_error = None
        return changes

    def load(self) -> ChangeSet:
        """Load once; raises ``LocalConfigError`` (the caller decides whether that is fatal)."""
        return self._applied(self._parse())

    async def reload_async(self) -> bool:
        """Reload after a change, parsing in a thread; a bad file is logged and refused."""
        try:
            batch = await asyncio.to_thread(self._parse)
        except LocalConfigError as e:
            self._refused(str(e))
            return False
        except Exception as e:  # a validator bug must refuse the file, not stop the watch
            log.exception("local config could not be parsed")
            self._refused(f"{type(e).__name__}: {e}")
            return False
        changes = self._applied(batch)
        log.info("local config reloaded (generation %d)", changes.generation)
        return True

    def _refused(self, error: str) -> None:
        self.failures += 1
        self.last_error = truncate(error)
        log.error("local config not reloaded, keeping the last good state: %s", self.last_error)

    def _file_stamp(self) -> tuple[int, int] | None:
        assert self._path is not None
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    async def watch(self) -> None:
        """Poll the file for changes (cheap, and works for ConfigMap symlink swaps too)."""
        if self._path is None:
            return
        while True:
            await asyncio.sleep(POLL_INTERVAL_S)
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                await self.reload_async()
