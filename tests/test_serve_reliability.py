"""meteor serve as an operator runs it: real server processes on loopback (uvicorn, the model worker
in its own process), driven by the official `openai` client, by httpx and by raw sockets.

Each numbered defect of issue 30 has its test here, plus the reliability checks: fuzzed request bodies,
a soak of mixed requests, SIGTERM during streams and client disconnects. A client that goes away
is imitated as a browser tab or a `curl` killed mid-request does it: the socket closes."""

from __future__ import annotations

import functools
import io
import json
import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from talk_helpers import data_url, meteor_server, noise_image, png_bytes, save_talkative_model

KEY = "reliability-key-77"
AUTH = {"Authorization": f"Bearer {KEY}"}
STORY = [{"role": "user", "content": "Tell me a story"}]
"""A prompt the tiny model answers without an end token for thousands of tokens (a long generation)."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_talkative_model(tmp_path_factory.mktemp("reliability") / "tiny")


@pytest.fixture(scope="module")
def long(model_dir):
    """Long answers allowed: what the disconnect and seed tests need."""
    args = ["--model-name", "tiny", "--api-key-env", "METEOR_RELIABILITY_KEY", "--max-tokens-limit", "2048",
            "--max-batch-size", "4", "--batch-window-ms", "10", "--no-ui"]
    with meteor_server(model_dir, args, env={"METEOR_RELIABILITY_KEY": KEY}) as (base, process, log):
        yield {"base": base, "process": process, "log": log}


@pytest.fixture(scope="module")
def strict(model_dir):
    """A 2-second request timeout and short answers: every request is over quickly. Its first
    scrape of /metrics is taken before any request."""
    args = ["--model-name", "tiny", "--max-tokens-limit", "4096", "--request-timeout", "2",
            "--max-batch-size", "4", "--batch-window-ms", "10", "--queue-size", "8", "--max-body-mb", "8",
            "--no-ui"]
    with meteor_server(model_dir, args) as (base, process, log):
        first = httpx.get(base + "/metrics", timeout=10)
        yield {"base": base, "process": process, "log": log, "first_metrics": first}


def chat(base, payload, headers=None, timeout=60, **kwargs):
    return httpx.post(base + "/v1/chat/completions", json=payload, headers=headers, timeout=timeout, **kwargs)


def body(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0,
            **fields}


def assert_openai_error(response, status=None):
    assert response.headers["content-type"].startswith("application/json"), response.text[:300]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if status is not None:
        assert response.status_code == status, response.text[:300]
    return error


def json_metrics(server, headers=None):
    response = httpx.get(server["base"] + "/metrics", params={"format": "json"}, headers=headers, timeout=10)
    assert response.status_code == 200, response.text[:300]
    return response.json()


def wait_for(predicate, timeout=30, every=0.02):
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "timed out waiting"
        time.sleep(every)


def raw_request(base, payload, headers=()) -> socket.socket:
    """Send a POST on a raw socket and return the socket, unread (a client that may just leave)."""
    host, port = base.removeprefix("http://").split(":")
    data = json.dumps(payload).encode()
    sock = socket.create_connection((host, int(port)))
    head = [f"POST /v1/chat/completions HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(data)}", *headers]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    return sock


# --- defect 1: a client that leaves frees its batch slot ------------------------------------------------

@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_client_that_leaves_stops_its_generation_within_a_decode_step(long, stream):
    """A request asks for 2,000 tokens (~minutes on this model), its client closes the socket; the
    next request must not wait for those tokens, and the row stops one token after the server
    learnt of the disconnect at most (the server logs how many tokens came after)."""
    server = long
    sock = raw_request(server["base"], {**body(max_tokens=2000, messages=STORY), "stream": stream},
                       [f"Authorization: Bearer {KEY}"])
    wait_for(lambda: json_metrics(server, AUTH)["running"] == 1)
    time.sleep(0.3)
    sock.close()
    began = time.monotonic()
    after = chat(server["base"], body(max_tokens=4), headers=AUTH, timeout=20)
    assert after.status_code == 200, after.text
    assert time.monotonic() - began < 5
    wait_for(lambda: json_metrics(server, AUTH)["running"] == 0, timeout=5)
    gone = re.findall(r"client gone: its row stopped (\d+) token\(s\) later", server["log"].read_text())
    assert gone and int(gone[-1]) <= 1, gone


# --- defect 2: sampling state is per request ---------------------------------------------------------

def test_a_seeded_request_does_not_fix_the_next_unseeded_ones(long):
    client = openai.OpenAI(base_url=long["base"] + "/v1", api_key=KEY, max_retries=0, timeout=60)

    def ask(**extra):
        answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                                max_tokens=12, temperature=1.0, **extra)
        return answer.choices[0].message.content

    seeded, unseeded = [], []
    for _ in range(3):
        seeded.append(ask(seed=7))
        unseeded.append(ask())
    assert len(set(seeded)) == 1                 # the seed decides its request's tokens ...
    assert len(set(unseeded)) > 1, unseeded      # ... and no one else's


# --- defect 3: a seed outside 64 bits ----------------------------------------------------------------

def test_a_seed_beyond_64_bits_is_a_400_naming_the_seed(strict):
    for seed in (2 ** 80, -(2 ** 70)):
        response = chat(strict["base"], body(seed=seed, temperature=1))
        error = assert_openai_error(response, 400)
        assert error["param"] == "seed" and "64" in error["message"]
    assert chat(strict["base"], body(seed=2 ** 63 - 1, temperature=1)).status_code == 200


# --- defect 4: JSON nested beyond the parser -----------------------------------------------------------

def test_a_deeply_nested_body_is_an_openai_error_not_a_500(strict):
    for depth in (100_000, 5_000):
        deep = b'{"model": "tiny", "messages": ' + b"[" * depth + b"]" * depth + b"}"
        response = httpx.post(strict["base"] + "/v1/chat/completions", content=deep,
                              headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == 400, response.text[:300]
        assert assert_openai_error(response)["code"] == "invalid_json"
    assert chat(strict["base"], body()).status_code == 200


# --- defect 5: images: a limit per request, decoding that does not starve others -------------------------

@functools.cache
def big_png(side: int = 4000) -> bytes:
    """A side×side PNG of some 200 kB that takes Pillow a good fraction of a second to decode (a
    smooth gradient), as a scan or a screenshot of a large screen would."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((side, side), Image.NEAREST).convert("RGB").save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def images_message(urls, text="Describe the images."):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         *({"type": "image_url", "image_url": {"url": u}} for u in urls)]}]


def test_a_request_may_carry_at_most_the_image_limit(strict):
    url = data_url(png_bytes(noise_image(1, (56, 56))))
    error = assert_openai_error(chat(strict["base"], body(messages=images_message([url] * 9))), 400)
    assert "--limit-images-per-request" in error["message"] and "9" in error["message"]
    assert error["code"] == "too_many_images"
    assert chat(strict["base"], body(messages=images_message([url] * 8))).status_code == 200


def test_big_images_of_one_request_do_not_stall_the_others(strict):
    """One request with 8 large PNGs (several seconds of decoding) and, meanwhile, small text
    requests: each of those is answered long before the big request's images are decoded."""
    urls = [data_url(big_png())] * 8
    big_payload = body(messages=images_message(urls))
    done = {}

    def big():
        began = time.monotonic()
        done["big"] = (httpx.post(strict["base"] + "/v1/chat/completions", json=big_payload, timeout=60),
                       time.monotonic() - began)

    thread = threading.Thread(target=big)
    thread.start()
    time.sleep(0.3)
    small = []
    for _ in range(3):
        began = time.monotonic()
        assert chat(strict["base"], body()).status_code == 200
        small.append(time.monotonic() - began)
    thread.join()
    response, took = done["big"]
    # the big one either finished or ran out of its 2 s (decoding counts against its deadline)
    assert response.status_code in (200, 408), response.text[:300]
    assert max(small) < min(1.0, took / 2), (small, took)


def test_decoding_counts_against_the_request_deadline(strict):
    urls = [data_url(big_png())] * 8
    began = time.monotonic()
    response = chat(strict["base"], body(messages=images_message(urls)))
    took = time.monotonic() - began
    error = assert_openai_error(response, 408)
    assert error["code"] == "timeout" and took < 6, took


# --- defect 6: the metrics count what happened -----------------------------------------------------------

def test_every_counter_is_there_before_the_first_request(strict):
    from prometheus_client.parser import text_string_to_metric_families

    first = strict["first_metrics"]
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/plain")
    samples = {s.name: s.value for family in text_string_to_metric_families(first.text) for s in family.samples}
    for name in ("meteor:prompt_tokens_total", "meteor:visual_tokens_total", "meteor:completion_tokens_total",
                 "meteor:num_requests_running", "meteor:num_requests_waiting"):
        assert samples[name] == 0, name
    for name in ("meteor:time_to_first_token_seconds_count", "meteor:e2e_request_latency_seconds_count",
                 "meteor:request_queue_time_seconds_count", "meteor:batch_size_count"):
        assert samples[name] == 0, name


def test_a_request_that_times_out_while_generating_is_not_counted_answered(strict):
    before = json_metrics(strict)
    response = chat(strict["base"], body(max_tokens=4000, messages=STORY))
    assert assert_openai_error(response, 408)["code"] == "timeout"
    after = json_metrics(strict)
    assert after["timeouts"] == before["timeouts"] + 1
    assert after["answered"] == before["answered"]


# --- defect 7: the smaller ones --------------------------------------------------------------------------

def test_an_image_above_pillows_own_limit_names_the_servers_flag(strict):
    from PIL import Image

    huge = png_bytes(Image.new("1", (20_000, 10_000)))     # 200 Mpixels: above Pillow's 2 × 89 M
    error = assert_openai_error(chat(strict["base"], body(messages=images_message([data_url(huge)]))), 400)
    assert "--max-image-pixels" in error["message"] and "PIL" not in error["message"], error


def test_a_full_queue_says_when_to_retry(strict):
    flood = body(max_tokens=200, messages=STORY)
    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(lambda _: chat(strict["base"], flood), range(20)))
    refused = [r for r in responses if r.status_code == 429]
    assert refused, [r.status_code for r in responses]
    assert assert_openai_error(refused[0])["code"] == "queue_full"
    assert all(int(r.headers["retry-after"]) >= 1 for r in refused)


def test_a_body_that_is_not_sent_as_json_is_refused(strict):
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {} if content_type is None else {"Content-Type": content_type}
        response = httpx.post(strict["base"] + "/v1/chat/completions", content=json.dumps(body()).encode(),
                              headers=headers, timeout=30)
        error = assert_openai_error(response, 415)
        assert "application/json" in error["message"], error
    assert httpx.post(strict["base"] + "/v1/chat/completions", content=json.dumps(body()).encode(),
                      headers={"Content-Type": "application/json; charset=utf-8"}, timeout=30).status_code == 200


# --- 9: Prometheus text -----------------------------------------------------------------------------------

def test_metrics_are_prometheus_text_and_move_as_requests_are_served(strict):
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        response = httpx.get(strict["base"] + "/metrics", timeout=10)
        assert response.status_code == 200
        families = {f.name: f for f in text_string_to_metric_families(response.text)}
        return families, {(s.name, tuple(sorted(s.labels.items()))): s.value
                          for f in families.values() for s in f.samples}

    families, before = scrape()
    assert families["meteor:time_to_first_token_seconds"].type == "histogram"
    assert families["meteor:batch_size"].type == "histogram"
    assert families["meteor:prompt_tokens"].type == "counter"
    url = data_url(png_bytes(noise_image(5, (112, 56))))
    answers = [chat(strict["base"], body(messages=images_message([url], f"What is it? ({i})"), max_tokens=3))
               for i in range(3)]
    assert all(a.status_code == 200 for a in answers)
    _, after = scrape()

    def moved(name, labels=()):
        return after[(name, labels)] - before.get((name, labels), 0)

    usage = [a.json()["usage"] for a in answers]
    assert moved("meteor:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usage)
    assert moved("meteor:visual_tokens_total") == sum(u["visual_tokens"] for u in usage) > 0
    assert moved("meteor:completion_tokens_total") == sum(u["completion_tokens"] for u in usage)
    for name in ("meteor:time_to_first_token_seconds_count", "meteor:e2e_request_latency_seconds_count",
                 "meteor:request_queue_time_seconds_count"):
        assert moved(name) == 3, name
    assert moved("meteor:batch_size_count") >= 1
    finished = sum(moved("meteor:request_success_total", (("finished_reason", r),)) for r in ("stop", "length"))
    assert finished == 3
    assert after[("meteor:num_requests_running", ())] == 0
    stats = httpx.get(strict["base"] + "/stats", timeout=10).json()
    assert stats["answered"] >= 3 and stats["ready"] is True


# --- the model in a thread (--worker thread) ---------------------------------------------------------------

def test_the_model_in_a_thread_answers_as_in_its_own_process(long, model_dir):
    url = data_url(png_bytes(noise_image(12, (168, 112))))
    payload = body(messages=images_message([url], "Describe the image."), max_tokens=12)
    in_process = chat(long["base"], payload, headers=AUTH)
    with meteor_server(model_dir, ["--model-name", "tiny", "--worker", "thread", "--no-ui"]) as (base, _, _):
        in_thread = chat(base, payload)
        stats = httpx.get(base + "/stats", timeout=10).json()
    assert in_process.status_code == in_thread.status_code == 200
    assert in_thread.json()["choices"][0]["message"] == in_process.json()["choices"][0]["message"]
    assert in_thread.json()["usage"] == in_process.json()["usage"]
    assert stats["worker"] == "thread" and json_metrics(long, AUTH)["worker"] == "process"
    assert stats["answered"] == 1


# --- reliability: fuzzed bodies, a soak, SIGTERM ----------------------------------------------------------

@pytest.fixture(scope="module")
def fuzzed(model_dir):
    """Short answers only (8 tokens at most), 2 images per request: every fuzzed body is over fast."""
    args = ["--model-name", "tiny", "--max-tokens-limit", "8", "--limit-images-per-request", "2",
            "--max-batch-size", "8", "--queue-size", "64", "--max-body-mb", "1", "--no-ui"]
    with meteor_server(model_dir, args) as (base, process, log):
        yield {"base": base, "process": process, "log": log}


FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n",
          "stream", "stream_options", "tokens_per_slice", "return_selection", "tools", "logprobs", "response_format",
          "user")


def json_values():
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=2 ** 62, max_value=2 ** 90)
               | st.floats() | st.text(max_size=12))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=8) | st.sampled_from(FIELDS), inner, max_size=3),
                        max_leaves=10)


def request_bodies():
    """JSON texts: anything; a valid request with fields replaced or removed; messages built from
    plausible parts (roles, text and image parts, data URLs with good or broken payloads)."""
    from hypothesis import strategies as st

    valid = body(max_tokens=2)
    tiny_png = data_url(png_bytes(noise_image(3, (28, 28))))
    urls = st.sampled_from([tiny_png, tiny_png[:40], "data:image/png;base64,!!!!", "http://example.com/a.png",
                            "/etc/passwd", "file:///etc/hostname", "data:text/plain;base64,aGk=", ""]) | st.text(max_size=30)
    parts = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20) | json_values()}),
                      st.fixed_dictionaries({"type": st.just("image_url"),
                                             "image_url": st.fixed_dictionaries({"url": urls}) | json_values()}),
                      json_values())
    messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                               "content": st.text(max_size=20) | st.lists(parts, max_size=3)})
                        | json_values(), max_size=4)
    changed = st.builds(lambda new, gone: {**{k: v for k, v in valid.items() if k not in gone}, **new},
                        st.dictionaries(st.sampled_from(FIELDS), json_values(), max_size=3),
                        st.sets(st.sampled_from(FIELDS), max_size=2))
    with_messages = st.builds(lambda m, stream: {**valid, "messages": m, "stream": stream}, messages, st.booleans())
    as_json = st.one_of(json_values(), changed, with_messages).map(json.dumps)
    return as_json | st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("latin-1"))


def test_fuzzed_bodies_get_an_answer_or_openai_error_json_never_a_5xx(fuzzed):
    from hypothesis import HealthCheck, given, settings

    client = httpx.Client(base_url=fuzzed["base"], timeout=30, headers={"Content-Type": "application/json"})

    @settings(max_examples=250, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request_bodies())
    def check(text):
        response = client.post("/v1/chat/completions", content=text.encode("utf-8", "surrogatepass"))
        assert response.status_code < 500, (text[:300], response.text[:300])
        if response.status_code != 200:
            assert_openai_error(response)
        elif response.headers["content-type"].startswith("text/event-stream"):
            assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
        else:
            assert response.json()["object"] == "chat.completion"

    try:
        check()
    finally:
        client.close()
    assert fuzzed["process"].poll() is None


def rss(process_id: int) -> int:
    """Resident memory of a process and its children (the model's worker process), in bytes."""
    import psutil

    process = psutil.Process(process_id)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)])


def test_a_soak_of_mixed_requests_has_no_5xx_and_bounded_memory(fuzzed):
    """Mixed traffic as a busy deployment sees it, from 6 clients: text and image questions,
    streamed and plain, greedy and sampled (seeded or not), malformed bodies, refused images and
    clients that leave mid-request. After a first round to warm caches and allocators, 300 more
    requests must not grow the server's memory (both processes) by more than 15 %."""
    small = data_url(png_bytes(noise_image(8, (112, 56))))
    sliced = data_url(png_bytes(noise_image(9, (168, 112))))

    def one(index: int) -> int | None:
        kind = index % 10
        if kind == 0:
            return chat(fuzzed["base"], body(messages=images_message([small], f"What is it? {index}"),
                                             max_tokens=6)).status_code
        if kind == 1:
            with httpx.stream("POST", fuzzed["base"] + "/v1/chat/completions", timeout=60,
                              json=body(stream=True, max_tokens=8, messages=images_message([sliced]))) as response:
                text = "".join(response.iter_text())
            assert text.rstrip().endswith("data: [DONE]")
            return response.status_code
        if kind == 2:
            return chat(fuzzed["base"], body(temperature=0.8, seed=index, max_tokens=8)).status_code
        if kind == 3:
            return chat(fuzzed["base"], body(temperature=1.0, max_tokens=8,
                                             messages=images_message([small, sliced]))).status_code
        if kind == 4:
            return chat(fuzzed["base"], body(max_tokens=99)).status_code               # above the limit: 400
        if kind == 5:
            return chat(fuzzed["base"], body(messages=images_message([small] * 3))).status_code   # 3 images: 400
        if kind == 6:
            sock = raw_request(fuzzed["base"], body(max_tokens=8, messages=images_message([sliced])))
            time.sleep(0.01 * (index % 5))
            sock.close()                                                                  # a client that leaves
            return None
        if kind == 7:
            return httpx.post(fuzzed["base"] + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                              headers={"Content-Type": "application/json"}, timeout=30).status_code
        if kind == 8:
            return chat(fuzzed["base"], body(messages=images_message(["data:image/png;base64,iVBORw0KGgo="]))).status_code
        return chat(fuzzed["base"], body(stop=["e"], max_tokens=8,
                                         messages=[{"role": "user", "content": f"Tell me about {index}"}])).status_code

    def run(indices) -> list[int]:
        with ThreadPoolExecutor(6) as pool:
            return [s for s in pool.map(one, indices) if s is not None]

    warm = run(range(100))
    before = rss(fuzzed["process"].pid)
    statuses = run(range(100, 400))
    wait_for(lambda: json_metrics(fuzzed)["running"] == 0 and json_metrics(fuzzed)["queued"] == 0, timeout=30)
    after = rss(fuzzed["process"].pid)
    assert max(warm + statuses) < 500 and statuses.count(200) >= 150, sorted(set(statuses))
    assert after < before * 1.15, (before / 2 ** 20, after / 2 ** 20)
    stats = json_metrics(fuzzed)
    assert stats["cancelled"] >= 1 and stats["answered"] >= 150


def test_sigterm_lets_streams_finish_and_refuses_new_requests(model_dir):
    """What an orchestrator's rolling restart does: SIGTERM while answers stream. The streams end
    normally ([DONE] after their last token), a request sent meanwhile gets a 503 with
    Retry-After (so a client retries elsewhere), /health says 503, and the server then exits 0."""
    with meteor_server(model_dir, ["--model-name", "tiny", "--max-tokens-limit", "400", "--no-ui"]) as (base, process, log):
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
        streams = [client.chat.completions.create(model="tiny", messages=STORY, max_tokens=200, temperature=0,
                                                  stream=True) for _ in range(3)]
        firsts = [next(iter(stream)) for stream in streams]             # every answer has begun
        process.send_signal(signal.SIGTERM)
        wait_for(lambda: "draining" in log.read_text(), timeout=10)
        refused = chat(base, body())
        assert assert_openai_error(refused, 503)["code"] == "server_shutting_down"
        assert int(refused.headers["retry-after"]) >= 1
        assert httpx.get(base + "/health", timeout=10).status_code == 503
        ends = []
        for first, stream in zip(firsts, streams):
            chunks = [first, *stream]
            ends.append(chunks[-1].choices[0].finish_reason)
            assert len("".join(c.choices[0].delta.content or "" for c in chunks)) > 0
        assert ends == ["length"] * 3
        assert process.wait(30) == 0


def test_a_dead_model_process_fails_open_requests_and_stops_the_server(model_dir):
    """The model's process killed (the kernel's OOM killer does that): the request it was answering
    gets a 500 at once instead of waiting for its timeout, and the server exits with status 1, so
    that a supervisor restarts it."""
    import psutil

    with meteor_server(model_dir, ["--model-name", "tiny", "--max-tokens-limit", "2000", "--no-ui"]) as (base, process, log):
        worker = next(p for p in psutil.Process(process.pid).children() if "python" in p.name().lower()
                      and "resource_tracker" not in " ".join(p.cmdline()))
        done = {}
        thread = threading.Thread(target=lambda: done.update(response=chat(base, body(max_tokens=1500, messages=STORY))))
        thread.start()
        wait_for(lambda: json_metrics({"base": base})["running"] == 1)
        worker.kill()
        thread.join(30)
        error = assert_openai_error(done["response"], 500)
        assert error["code"] == "worker_exited"
        assert process.wait(30) == 1
        assert "the model worker process exited" in log.read_text()
