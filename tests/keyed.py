"""Keyed gateways on one Redis for tests of what API keys share across replicas (stored and background
responses): started with an admin key, tenant keys made through the admin API, `openai` SDK clients
closed with them."""

from __future__ import annotations

import httpx
import openai

from gateway.tenancy.keys import HASHER
from tests.harness import Proc, Stack


class KeyedGateways:
    """``count`` keyed gateways (``urls[i]``, ``procs[i]``); :meth:`replace` starts a new one in a slot."""

    def __init__(self, stack: Stack, admin: str, count: int = 2) -> None:
        self.stack = stack
        self.admin = admin
        self.procs: list[Proc] = []
        self.urls: list[str] = []
        self.clients: list[openai.OpenAI] = []
        for _ in range(count):
            self.procs.append(self.start())
            self.urls.append(stack.base_url)

    def start(self, **settings: object) -> Proc:
        """One more keyed gateway (``stack.base_url`` is its URL)."""
        return self.stack.gateway(auth=True, admin_key_hash=HASHER.hash(self.admin), **settings)

    def replace(self, i: int) -> None:
        self.procs[i] = self.start()
        self.urls[i] = self.stack.base_url

    def key(self) -> str:
        """A new tenant key (its secret)."""
        r = httpx.post(f"{self.urls[-1]}/admin/keys", json={"name": "tenant"}, timeout=10,
                       headers={"Authorization": f"Bearer {self.admin}"})
        assert r.status_code == 201, r.text
        return str(r.json()["key"])

    def sdk(self, url: str, key: str) -> openai.OpenAI:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.stack.stop()
