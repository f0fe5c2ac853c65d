"""/health tells the truth: 503 once the engine loop is not running (the process may still accept connections)."""
from __future__ import annotations

from starlette.testclient import TestClient

from serving import Engine
from serving.app import create_app


def test_health_answers_503_when_the_engine_loop_is_gone(tiny_model_dir):
    engine = Engine.from_pretrained(tiny_model_dir, max_model_len=128)
    client = TestClient(create_app(engine))
    assert client.get("/health").status_code == 200
    engine.shutdown()
    r = client.get("/health")
    assert r.status_code == 503 and "not running" in r.json()["status"]
