"""`retro serve`: the model on Ray Serve over HTTP, with the live neighbour pool.

One service for the module (starting Ray Serve and a replica costs seconds): the debug database (a copy:
documents are added to it) and a debug-size model with a wide initialisation (std 0.5), so its greedy
output depends visibly on every input, neighbours included (as in test_knowledge_update.py). Real Ray
Serve on 127.0.0.1, real HTTP, the real pool and encoder.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from conftest import debug_config

from retro_model.checkpoint import save_model_dir
from retro_model.model import Retro
from retro_platform.checkpoints import model_for_database
from retro_platform.db.manifest import load_manifest

FACT = (
    "The Zorblatt Quasiphone is a brass instrument that was invented in the year 2031 on the island of "
    "Velmora by the composer Ilse Brandtgaard, who tuned the Zorblatt Quasiphone to a scale of seventeen "
    "tones and played it for the first time in the harbour of Velmora. "
)
PROMPT = FACT + "The Zorblatt Quasiphone was invented by"


def free_port() -> int:
    """A TCP port nobody listens on (127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url: str, body: dict | bytes | None = None, method: str | None = None, timeout: float = 120):
    """(status, parsed JSON or text) of one HTTP request."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"))
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw, status = response.read().decode(), response.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(raw)
    except json.JSONDecodeError:
        return status, raw


def stream_events(url: str, body: dict, timeout: float = 120) -> list[dict]:
    """The server-sent events of a streamed completion."""
    request = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    events = []
    with urllib.request.urlopen(request, timeout=timeout) as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for line in response:
            line = line.decode().strip()
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: ") :]))
    return events


@pytest.fixture(scope="module")
def service(debug_db, tmp_path_factory):
    """(config, base URL, checkpoint) of a running service on a copy of the debug database."""
    from ray import serve

    from retro_platform.serve.app import start_service

    source, _ = debug_db
    work = tmp_path_factory.mktemp("serve")
    shutil.copytree(source.db_path, work / "db")
    config = debug_config(
        work,
        f"serve.port={free_port()}",
        "serve.cpus_per_replica=0.5",
        "serve.max_replicas=1",
        "serve.max_tokens=64",
        "serve.max_body_bytes=20000",
        "generate.max_new_tokens=24",
    )
    manifest = load_manifest(config.db_path)
    torch.manual_seed(0)
    model = Retro(dataclasses.replace(model_for_database(config, manifest).model, init_std=0.5))
    checkpoint = work / "checkpoint"
    save_model_dir(checkpoint, model, extra={"step": 0, "tokenizer_sha256": manifest.tokenizer.sha256})
    url = start_service(config, str(checkpoint))
    deadline = time.monotonic() + 120
    while call(url + "/healthz")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    yield config, url, checkpoint
    serve.shutdown()


def completion(url: str, prompt: str = PROMPT, **fields) -> dict:
    status, body = call(url + "/v1/completions", {"prompt": prompt, "max_tokens": 24, **fields})
    assert status == 200, body
    return body


def test_greedy_completion_equals_retro_generate_and_reports_the_neighbours_read(service):
    from retro_model.checkpoint import load_model_dir
    from retro_platform.generation import complete
    from retro_platform.neighbors.pool import NeighborPool

    config, url, checkpoint = service
    served = completion(url)
    model, _ = load_model_dir(checkpoint)
    pool = NeighborPool.start(config)  # attaches to the service's shard actors by name
    expected, used = complete(dataclasses.replace(config, generate=config.generate), model, pool, PROMPT)
    assert served["text"] == expected
    assert served["usage"]["completion_tokens"] == 24 and served["usage"]["prompt_tokens"] > 64
    # one entry per completed chunk, each with the neighbours the model read and their scores
    assert len(served["chunks"]) == len(used) >= 1
    for chunk, (text, ids, scores) in zip(served["chunks"], used, strict=True):
        assert chunk["chunk"] == text
        assert [n["chunk_id"] for n in chunk["neighbors"]] == [i for i in ids if i >= 0]
        # the encoder's bf16 results depend on its thread count (the replica has 1, this process 2)
        assert [n["score"] for n in chunk["neighbors"]] == pytest.approx(
            [s for s in scores if s > -1e30], abs=5e-3
        )
        assert all(n["text"] and isinstance(n["doc_id"], int) for n in chunk["neighbors"])


def test_streaming_yields_the_tokens_of_the_plain_completion(service):
    """The streamed tokens concatenate to the plain completion; they arrive in several events (each
    holds what was generated within ``serve.stream_interval_ms``), the first well before the end."""
    _, url, _ = service
    plain = completion(url, seed=3, temperature=0.8, top_k=20)
    events = stream_events(
        url + "/v1/completions",
        {"prompt": PROMPT, "max_tokens": 24, "seed": 3, "temperature": 0.8, "top_k": 20},
    )
    tokens = [e for e in events if "token" in e]
    assert events[-1]["done"] and len(tokens) >= 2
    assert "".join(e["token"] for e in tokens) == events[-1]["text"] == plain["text"]
    assert sum(len(e["ids"]) for e in tokens) == 24
    assert any("chunk" in e for e in events)  # neighbours arrive as their chunk is read


def test_concurrent_requests_are_batched_and_each_gets_its_own_completion(service):
    _, url, _ = service
    prompts = [PROMPT, "Wikipedia is a free online encyclopedia. " * 12, FACT * 2]
    alone = [completion(url, p)["text"] for p in prompts]
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = completion(url, prompts[i])["text"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == alone
    status, info = call(url + "/v1/info")
    assert status == 200 and info["replica"]["mean_batch"] > 1.0  # some steps carried several rows


BAD_REQUESTS = [
    ("/v1/completions", b'{"prompt": "x", ', 400, "malformed JSON"),
    ("/v1/completions", b"[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"prompt": ""}, 422, "prompt"),
    ("/v1/completions", {"prompt": "   "}, 422, "prompt"),
    ("/v1/completions", {"max_tokens": 5}, 422, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 65}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 422, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 422, "top_p"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes please"}, 422, "stream"),
    ("/v1/completions", {"prompt": "hi", "frobnicate": 1}, 422, "frobnicate"),
    ("/v1/completions", {"prompt": "hi", "ignore_eos": "maybe"}, 422, "ignore_eos"),
    ("/v1/completions", {"prompt": "x" * 30_000}, 413, "body"),
    ("/v1/documents", {"documents": []}, 422, "documents"),
    ("/v1/documents", {"documents": [{"id": "a", "text": ""}]}, 422, "documents.0.text"),
    ("/v1/documents", {"documents": [{"id": "a", "text": "t", "colour": "red"}]}, 422, "colour"),
    ("/v1/documents", {"documents": [{"id": "a", "text": "t"}, {"id": "a", "text": "u"}]}, 422, "unique"),
    ("/v1/neighbors", None, 422, "text"),
    ("/v1/neighbors?text=hi&k=zero", None, 422, "k"),
]


def test_bad_requests_get_a_one_line_4xx_naming_the_field_and_the_service_stays_up(service):
    _, url, _ = service
    for path, body, status, field in BAD_REQUESTS:
        got, answer = call(url + path, body)
        assert got == status, (path, body, got, answer)
        assert isinstance(answer, dict) and list(answer) == ["error"], answer
        assert field in answer["error"] and "\n" not in answer["error"], (field, answer)
    # a prompt whose tokens + max_tokens exceed the model's max_seq_len (512): refused by the replica
    got, answer = call(url + "/v1/completions", {"prompt": "word " * 600, "max_tokens": 64})
    assert got == 422 and "max_seq_len" in answer["error"]
    assert completion(url, "Ray is a framework for")["usage"]["completion_tokens"] == 24


def test_health_info_and_neighbors(service):
    config, url, _ = service
    assert call(url + "/healthz") == (200, {"status": "ok"})
    status, info = call(url + "/v1/info")
    assert status == 200
    manifest = load_manifest(config.db_path)
    assert info["database"]["chunks"] == sum(manifest.counts.chunks.values())
    assert info["model"]["retrieval"] and info["model"]["neighbor_alignment"] == "match"
    status, found = call(
        url + "/v1/neighbors?text=" + urllib.request.quote("The history of the Roman Empire") + "&k=3"
    )
    assert status == 200 and len(found["neighbors"]) == 3
    scores = [n["score"] for n in found["neighbors"]]
    assert scores == sorted(scores, reverse=True)
    status, page = call(url + "/")
    assert status == 200 and "<title>RETRO</title>" in page


def test_a_posted_document_is_read_by_the_next_completion_and_is_durable(service):
    from retro_platform.db.store import ChunkStore

    config, url, _ = service
    before = completion(url)
    assert not any("Zorblatt" in n["text"] for c in before["chunks"] for n in c["neighbors"])
    revision = load_manifest(config.db_path).revision or 0
    status, added = call(
        url + "/v1/documents", {"documents": [{"id": "zorblatt", "text": FACT * 3, "title": "Z"}]}
    )
    assert status == 200 and added["added"] == 1 and added["revision"] == revision + 1, added
    after = completion(url)
    assert any("Zorblatt" in n["text"] for c in after["chunks"] for n in c["neighbors"])
    assert after["text"] != before["text"]  # the same weights, a different completion
    # durable: the database on disk holds the document (a restarted service starts from it)
    manifest = load_manifest(config.db_path)
    assert manifest.revision == revision + 1 and manifest.counts.documents["added"] >= 1
    store = ChunkStore(config.db_path, manifest)
    first, last = store.split_range("added")
    assert any("Zorblatt" in text for text in store.texts(list(range(first, last))))
    # the same id again is refused by the add-docs stage, naming the document
    status, refused = call(url + "/v1/documents", {"documents": [{"id": "zorblatt", "text": "again"}]})
    assert status == 422 and "zorblatt" in refused["error"]


PAGE_DOCUMENT = (
    "The Orvel Lantern Festival is held every autumn in the mountain village of Kestrin Vale, where the "
    "villagers float seven hundred paper lanterns down the river Aumer to remember the flood of 1897. "
    "Each lantern carries the name of a family, and the last one is lit by the oldest person of the village."
)


def test_the_page_streams_a_completion_shows_its_neighbours_and_adds_a_document(service, tmp_path):
    """Loads the page in Debian's chromium (headless, through chromedriver), adds a document with the
    form, submits a prompt taken from it, waits for the streamed text and checks the neighbours shown
    (scores and the added document's text)."""
    import os
    import shutil as sh

    browser, driver_path = sh.which("chromium"), sh.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, url, _ = service
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(url + "/")
        WebDriverWait(driver, 30).until(lambda d: "documents" in d.find_element(By.ID, "info").text)
        driver.find_element(By.ID, "doc_id").send_keys("orvel-lanterns")
        driver.find_element(By.ID, "doc_text").send_keys(PAGE_DOCUMENT * 2)
        driver.find_element(By.ID, "add").click()
        WebDriverWait(driver, 120).until(lambda d: "added" in d.find_element(By.ID, "doc_status").text)
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys(PAGE_DOCUMENT)
        max_tokens = driver.find_element(By.ID, "max_tokens")
        max_tokens.clear()
        max_tokens.send_keys("16")
        driver.find_element(By.ID, "generate").click()
        WebDriverWait(driver, 120).until(
            lambda d: d.find_element(By.ID, "completion").get_attribute("data-done") == "true"
        )
        assert driver.find_element(By.ID, "generated").text.strip()
        assert "16 tokens" in driver.find_element(By.ID, "status").text
        neighbours = driver.find_elements(By.CSS_SELECTOR, "#neighbors .neighbor")
        assert neighbours
        scores = [float(n.find_element(By.CLASS_NAME, "score").text) for n in neighbours]
        assert all(-1.0 <= s <= 1.0 for s in scores)
        assert any("Kestrin Vale" in n.text for n in neighbours)  # the document the form added
        if os.environ.get("RETRO_PAGE_SCREENSHOT"):
            driver.save_screenshot(os.environ["RETRO_PAGE_SCREENSHOT"])
    finally:
        driver.quit()


def test_a_replica_killed_under_load_loses_no_request_beyond_client_retries(service):
    """The generator replica is killed (Ray actor kill) while 6 requests run; each client retries a
    failed request up to 3 times. Every request completes, and the service keeps answering."""
    import ray

    _, url, _ = service

    def with_retries(i: int, results: dict) -> None:
        for attempt in range(4):
            try:
                status, body = call(url + "/v1/completions", {"prompt": PROMPT + f" {i}", "max_tokens": 24})
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                status, body = 0, None
            if status == 200:
                results[i] = (attempt, body["text"])
                return
            time.sleep(1 + attempt)
        results[i] = (None, body)

    results: dict[int, tuple] = {}
    threads = [threading.Thread(target=with_retries, args=(i, results)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    status, info = call(url + "/v1/info")  # the (only) generator replica names its actor
    assert status == 200 and info["replica"]["actor"]
    ray.kill(ray.get_actor(info["replica"]["actor"], namespace="serve"), no_restart=True)
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(6))
    assert all(attempt is not None for attempt, _ in results.values()), results
    assert completion(url, "After the restart")["usage"]["completion_tokens"] == 24


def test_a_model_trained_with_another_tokenizer_is_refused_before_any_replica_starts(debug_db, tmp_path):
    from retro_platform.errors import CheckpointError
    from retro_platform.serve.app import check_service

    config, manifest = debug_db
    model = Retro(model_for_database(config, manifest).model)
    checkpoint = tmp_path / "other"
    save_model_dir(checkpoint, model, extra={"step": 1, "tokenizer_sha256": "0" * 64})
    with pytest.raises(CheckpointError, match="tokenizer"):
        check_service(config, str(checkpoint))
    with pytest.raises(CheckpointError, match="models:/no-such-model/1"):
        check_service(config, "models:/no-such-model/1")
    save_model_dir(checkpoint, model, extra={"step": 1, "tokenizer_sha256": manifest.tokenizer.sha256})
    assert check_service(config, str(checkpoint))["retrieval"] is True
