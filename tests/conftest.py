"""Fixtures: servers (embedded and TCP) with the test models."""

from __future__ import annotations

import secrets
from typing import Iterator

import pytest
from support import TEST_MODELS, TcpServer

from dlserver.client import Client


@pytest.fixture
def embedded() -> Iterator[Client]:
    client = Client.spawn(models_dirs=[str(TEST_MODELS)], timeout=60)
    yield client
    client.close()


@pytest.fixture
def tcp_server() -> Iterator[TcpServer]:
    server = TcpServer(token=secrets.token_hex(8))
    yield server
    server.stop()
