"""
The site supervisor: one named child service per enabled site.

On start it loads the enabled sites from the database and runs one
L{SiteService} for each; C{add_site} / C{remove_site} change the set while
running.  Each child reports its state changes to the batch writer, which
keeps C{mqtt_connection} up to date.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from mqttsvc.config import SiteConfig
from mqttsvc.site import SiteService, SiteState
from mqttsvc.store import Store


class SiteSupervisor(MultiService):
    """
    Runs a L{SiteService} per enabled site, reconciled by name.
    """

    log = Logger()
    name = "sites"

    def __init__(
        self,
        reactor: Any,
        store: Store,
        site_factory: Callable[..., SiteService] = SiteService,
    ) -> None:
        super().__init__()
        self._reactor = reactor
        self._store = store
        self._site_factory = site_factory
        self._loading: Deferred[None] | None = None
        self.loaded = False

    def startService(self) -> None:
        super().startService()
        self._loading = Deferred.fromCoroutine(self._load())
        self._loading.addErrback(
            lambda f: self.log.failure("could not load the sites from the database", f)
        )

    async def _load(self) -> None:
        sites = await self._store.load_enabled_sites()
        for config, last_connected_at in sites:
            if self.running and config.site_id not in self.namedServices:
                self._attach(config, last_connected_at)
        self.loaded = True
        self.log.info("started {count} enabled sites", count=len(sites))

    def whenLoaded(self) -> Deferred[None]:
        """
        Fire once the sites from the database have been started.
        """
        assert self._loading is not None, "the supervisor has not been started"
        d: Deferred[None] = Deferred()

        def done(result: object) -> object:
            d.callback(None)
            return result

        self._loading.addBoth(done)
        return d

    def _attach(self, config: SiteConfig, last_connected_at: datetime | None = None) -> SiteService:
        site = self._site_factory(
            self._reactor,
            config,
            self._store.writer,
            self._report,
            last_connected_at=last_connected_at,
        )
        site.setServiceParent(self)
        return site

    def _report(self, state: SiteState) -> None:
        self._store.writer.set_status(state.as_update())

    def site(self, site_id: str) -> SiteService | None:
        """
        The running service of a site, if it has one.
        """
        service = self.namedServices.get(site_id)
        return service if isinstance(service, SiteService) else None

    def sites(self) -> list[SiteService]:
        return [s for s in self if isinstance(s, SiteService)]

    def add_site(self, config: SiteConfig) -> SiteService:
        """
        Start a service for a newly enabled site.
        """
        existing = self.site(config.site_id)
        if existing is not None:
            return existing
        return self._attach(config)

    async def remove_site(self, site_id: str) -> None:
        """
        Stop a site's service (clean DISCONNECT) and detach it.
        """
        site = self.site(site_id)
        if site is None:
            return
        await site.disownServiceParent()

    def stopService(self) -> Deferred[None]:
        """
        Stop every site, each with a clean DISCONNECT, and wait for all.
        """
        self.running = False
        stops = [Deferred.fromCoroutine(_maybe(s.stopService())) for s in self.sites()]
        return gatherResults(stops, consumeErrors=True).addCallback(lambda _: None)


async def _maybe(d: Deferred[None] | None) -> None:
    if d is not None:
        await d
