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


def test_server_refuses_to_start_with_a_pool_too_small_for_one_sequence():
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-m", "serving", "--port", "0", "--num-blocks", "2", "--no-warmup"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "--num-blocks" in p.stderr and "--max-model-len" in p.stderr
