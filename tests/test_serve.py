"""meteor serve: the protocol and the images in process, the batching worker on the tiny model, and
a real server process on loopback driven by the official `openai` client and by raw HTTP."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from meteor.serve.streaming import AnswerStream, Conversation, Sampling
from meteor.serve.images import ImageResolver
from meteor.serve.protocol import APIError, ImagePart, parse_chat_request
from meteor.serve.worker import BatchingWorker, Job, QueueFull
from meteor.pretrained import load_pretrained
from talk_helpers import (data_url, meteor_server, noise_image, png_bytes, save_talkative_model,
                          talkative_model)

KEY = "test-key-3f9a"
LIMITS = dict(model_name="tiny", max_tokens_limit=64)


def body(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **fields}


# --- the protocol ----------------------------------------------------------------------------------

def test_a_request_becomes_alternating_turns_with_images_before_their_text():
    url = data_url(png_bytes(noise_image(0)))
    request = parse_chat_request(body(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "this?"}]},
        {"role": "user", "content": "Answer in one word."},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "user", "content": "Sure?"}], max_completion_tokens=5, stop="\n", seed=3,
        tokens_per_slice=2, return_selection=True, user="someone", presence_penalty=0), **LIMITS)
    human, gpt, last = request.messages
    assert (human.role, human.text) == ("human", "Be brief.\n\nWhat is\nthis?\nAnswer in one word.")
    assert [p.url for p in human.images] == [url] and human.images[0].param == "messages[1].content[1].image_url"
    assert (gpt.role, gpt.text, last.text) == ("gpt", "A cat.", "Sure?")
    assert (request.max_tokens, request.stop, request.tokens_per_slice, request.return_selection) == (5, ("\n",), 2, True)
    assert request.sampling == Sampling(1.0, 1.0, 3)          # OpenAI's default temperature is 1
    assert parse_chat_request(body(), **LIMITS).max_tokens == 64   # no max_tokens: the server's limit


@pytest.mark.parametrize("payload, status, param, code", [
    ([1, 2], 400, None, None),
    ({"messages": []}, 400, "model", None),
    (body(model="gpt-4o"), 404, "model", "model_not_found"),
    (body(messages=None), 400, "messages", None),
    (body(messages=[{"role": "robot", "content": "hi"}]), 400, "messages[0].role", None),
    (body(messages=[{"role": "user"}]), 400, "messages[0].content", None),
    (body(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400, "messages[0].content[0].type", None),
    (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
     "messages[0].content[0].image_url", None),
    (body(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]), 400, "messages[1].content", None),
    (body(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]), 400, "messages", None),
    (body(messages=[{"role": "assistant", "content": "yo"}, {"role": "user", "content": "hi"}]), 400, "messages", None),
    (body(max_tokens=65), 400, "max_tokens", "max_tokens_exceeded"),
    (body(max_tokens=0), 400, "max_tokens", None),
    (body(max_completion_tokens=100), 400, "max_completion_tokens", "max_tokens_exceeded"),
    (body(temperature=3), 400, "temperature", None),
    (body(top_p=0), 400, "top_p", None),
    (body(n=2), 400, "n", None),
    (body(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    (body(seed="7"), 400, "seed", None),
    (body(seed=2 ** 80), 400, "seed", None),
    (body(seed=-(2 ** 63) - 1), 400, "seed", None),
    (body(stream="yes"), 400, "stream", None),
    (body(tokens_per_slice=0), 400, "tokens_per_slice", None),
    (body(tools=[{"type": "function"}]), 400, "tools", "unsupported_parameter"),
    (body(logprobs=True), 400, "logprobs", "unsupported_parameter"),
    (body(response_format={"type": "json_object"}), 400, "response_format", "unsupported_parameter"),
])
def test_every_malformed_field_is_named(payload, status, param, code):
    with pytest.raises(APIError) as caught:
        parse_chat_request(payload, **LIMITS)
    error = caught.value.body()["error"]
    assert (caught.value.status, error["param"], error["code"]) == (status, param, code)
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


# --- images ----------------------------------------------------------------------------------------

@pytest.fixture
def image_root(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    noise_image(1, (56, 56)).save(root / "sub" / "inside.png")
    noise_image(2, (56, 56)).save(tmp_path / "outside.png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    return root


def refusal(resolver, url):
    with pytest.raises(APIError) as caught:
        resolver.load(ImagePart(url, "messages[0].content[1].image_url"))
    assert caught.value.status == 400 and caught.value.param == "messages[0].content[1].image_url"
    return caught.value


def test_images_come_inline_or_from_inside_the_image_root_only(image_root):
    resolver = ImageResolver(image_root, max_pixels=1_000_000)
    inline = resolver.load(ImagePart(data_url(png_bytes(noise_image(1, (56, 56)))), "p"))
    for name in ("sub/inside.png", str(image_root / "sub" / "inside.png"), f"file://{image_root}/sub/inside.png"):
        assert resolver.load(ImagePart(name, "p")).tobytes() == inline.tobytes()
    for name in ("../outside.png", str(image_root.parent / "outside.png"), "link.png", "/etc/hostname"):
        assert refusal(resolver, name).code == "image_path_refused"
    assert refusal(resolver, "sub/missing.png").code == "image_not_found"
    assert refusal(ImageResolver(None, 1_000_000), "sub/inside.png").code == "image_path_refused"
    assert "fetches nothing" in refusal(resolver, "https://example.com/cat.png").message


def test_broken_truncated_bomb_and_non_image_data_are_refused(image_root):
    resolver = ImageResolver(None, max_pixels=1_000_000)
    assert refusal(resolver, "data:image/png;base64,@@not base64@@").code == "invalid_base64"
    assert refusal(resolver, "data:text/plain;base64,aGVsbG8=").code == "invalid_image_url"
    assert refusal(resolver, "data:image/png,rawdata").code == "invalid_image_url"
    noisy = png_bytes(noise_image(3, (300, 300)))
    truncated = refusal(resolver, data_url(noisy[:len(noisy) * 2 // 3]))
    assert truncated.code == "invalid_image" and "truncated" in truncated.message
    from PIL import Image

    bomb = png_bytes(Image.new("1", (2000, 2000)))           # 4 Mpixels in a few kilobytes
    assert len(bomb) < 20_000
    refused = refusal(resolver, data_url(bomb))
    assert "4,000,000 pixels" in refused.message and "--max-image-pixels" in refused.message
    assert refusal(resolver, data_url(b"<html>404</html>")).code == "invalid_image"


def test_an_image_above_pillows_own_limit_is_refused_naming_the_servers_limit():
    from PIL import Image

    huge = png_bytes(Image.new("1", (20_000, 10_000)))        # 200 Mpixels, above Pillow's 2 × 89 M
    refused = refusal(ImageResolver(None, max_pixels=40_000_000), data_url(huge))
    assert "200,000,000 pixels" in refused.message and "40,000,000" in refused.message
    assert "--max-image-pixels" in refused.message and "PIL" not in refused.message


# --- the batching worker, in process ---------------------------------------------------------------

@pytest.fixture(scope="module")
def talker():
    return talkative_model()


def make_job(processor, question, image=None, k=None, max_tokens=6, sampling=Sampling(), deadline=None):
    events = []
    conversation = Conversation()
    conversation.ask(question, [image] if image is not None else [])
    stream = AnswerStream(processor.tokenizer, max_tokens, deadline=deadline)
    return Job(conversation.prompt_ids(processor, k), conversation.images, stream, k, sampling, events.append), events


def wait_done(events, timeout=60):
    started = time.monotonic()
    while not events or events[-1][0] not in ("done", "error"):
        assert time.monotonic() - started < timeout, events
        time.sleep(0.01)
    return events[-1]


def test_requests_that_arrive_together_share_a_batch_grouped_by_k(talker):
    model, processor = talker
    images = [processor.prepare_image(noise_image(s, size)) for s, size in enumerate([(56, 56), (112, 56), (168, 112)])]
    specs = [("What is it?", images[0], None), ("Describe the image.", images[1], None), ("Hi", None, None),
             ("Which colour?", images[2], 2), ("Count them.", images[0], 2)]
    alone = []
    for question, image, k in specs:
        worker = BatchingWorker(model, processor, max_batch_size=8, batch_window=0.0).start(warmup=False)
        job, events = make_job(processor, question, image, k)
        worker.submit(job)
        wait_done(events)
        worker.close()
        alone.append(job.stream.token_ids)
    worker = BatchingWorker(model, processor, max_batch_size=8, batch_window=0.5)
    jobs = [make_job(processor, q, i, k) for q, i, k in specs]
    for job, _ in jobs:                      # all waiting before the worker looks
        worker.submit(job)
    assert [job.crowded for job, _ in jobs] == [False, True, True, True, True]
    worker.start(warmup=False)
    for _, events in jobs:
        assert wait_done(events)[0] == "done"
    worker.close()
    assert [job.batch_size for job, _ in jobs] == [3, 3, 3, 2, 2]
    assert worker.stats()["batch_sizes"] == {2: 1, 3: 1}
    assert [job.stream.token_ids for job, _ in jobs] == alone
    assert len({tuple(a) for a in alone}) >= 4


def test_a_request_for_the_selection_runs_the_vision_tower_once_per_view(talker):
    model, processor = talker
    image = processor.prepare_image(noise_image(3, (168, 112)))          # 2×3 slices + the global view
    encoded = []
    hook = model.vision_tower.embeddings.register_forward_hook(lambda m, i, out: encoded.append(out.shape[0]))
    try:
        answers = []
        for want in (False, True):
            worker = BatchingWorker(model, processor, batch_window=0.0).start(warmup=False)
            job, events = make_job(processor, "Describe the image.", image, 2)
            job.want_selection = want
            encoded.clear()
            worker.submit(job)
            assert wait_done(events)[0] == "done"
            worker.close()
            answers.append(job.stream.token_ids)
            assert sum(encoded) == len(image.views()), (want, encoded)   # the selection reused the views
        assert answers[0] == answers[1] and len(job.selection) == len(image.views())
    finally:
        hook.remove()


def test_a_request_that_arrives_alone_does_not_wait_for_the_window(talker):
    model, processor = talker
    worker = BatchingWorker(model, processor, batch_window=30.0).start(warmup=False)
    job, events = make_job(processor, "Hello there", max_tokens=2)
    started = time.monotonic()
    worker.submit(job)
    wait_done(events, timeout=25)
    worker.close()
    assert not job.crowded and time.monotonic() - started < 25 and job.batch_size == 1


def test_the_queue_is_bounded_and_expired_or_cancelled_requests_leave_it(talker):
    model, processor = talker
    worker = BatchingWorker(model, processor, max_batch_size=4, batch_window=0.0, queue_size=2)   # not started
    late, late_events = make_job(processor, "late", deadline=time.monotonic() - 1)
    gone, gone_events = make_job(processor, "gone")
    gone.stream.cancel()
    worker.submit(late)
    worker.submit(gone)
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        worker.submit(make_job(processor, "one too many")[0])
    worker.start(warmup=False)
    kind, error = wait_done(late_events)
    assert kind == "error" and error.status == 408 and error.body()["error"]["code"] == "timeout"
    wait_done(gone_events)
    assert gone_events == [("done", gone)] and gone.stream.finish_reason == "cancelled"
    assert gone.batch_size == 0 and worker.stats()["queued"] == 0
    stats = worker.stats()
    worker.close()
    assert (stats["timeouts"], stats["cancelled"], stats["answered"], stats["rejected_queue_full"]) == (1, 1, 0, 1)


def test_a_request_cancelled_behind_others_leaves_the_queue(talker):
    """Found by the soak: a cancelled request behind another one in the queue (the first compared)
    must leave it without the worker comparing the two requests' images."""
    model, processor = talker
    worker = BatchingWorker(model, processor, max_batch_size=1, batch_window=0.0)
    first, first_events = make_job(processor, "What is it?", processor.prepare_image(noise_image(4, (112, 56))))
    gone, gone_events = make_job(processor, "What is it?", processor.prepare_image(noise_image(4, (112, 56))))
    worker.submit(first)
    worker.submit(gone)
    gone.stream.cancel()
    worker.start(warmup=False)
    assert wait_done(gone_events)[0] == "done" and wait_done(first_events)[0] == "done"
    worker.close()
    assert first.stream.finish_reason == "length" and gone.stream.finish_reason == "cancelled"


def test_a_seeded_request_leaves_the_process_generator_alone(talker):
    """A seed is the request's own: torch's global generator is neither reseeded nor drawn from,
    so sampled requests after it (and any other user of torch's generator) are unaffected."""
    model, processor = talker
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    worker = BatchingWorker(model, processor, batch_window=0.0).start(warmup=False)
    answers = []
    for sampling in (Sampling(1.0, 0.9, seed=5), Sampling(1.0, 0.9), Sampling(1.0, 0.9, seed=5), Sampling(1.0, 0.9)):
        job, events = make_job(processor, "Hi", sampling=sampling, max_tokens=12)
        worker.submit(job)
        wait_done(events)
        answers.append(job.stream.token_ids)
    worker.close()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert answers[0] == answers[2] and answers[1] != answers[3]


def test_rows_of_one_batch_sample_each_with_its_own_seed_and_temperature(talker):
    """Greedy, seeded and unseeded sampled requests share a batch; a seeded row gives what it gives
    alone (its own generator), a greedy row its greedy answer."""
    model, processor = talker
    specs = [("Hi", Sampling(1.0, 0.9, seed=5)), ("What is it?", Sampling()), ("Hello", Sampling(0.7, 1.0, seed=11)),
             ("Hi", Sampling(1.0, 0.9))]
    alone = []
    worker = BatchingWorker(model, processor, batch_window=0.0).start(warmup=False)
    for question, sampling in specs:
        job, events = make_job(processor, question, sampling=sampling, max_tokens=10)
        worker.submit(job)
        wait_done(events)
        alone.append(job.stream.token_ids)
    worker.close()
    assert len({job.key() for job, _ in (make_job(processor, q, sampling=s) for q, s in specs)}) == 1
    worker = BatchingWorker(model, processor, batch_window=0.5)
    jobs = [make_job(processor, question, sampling=sampling, max_tokens=10) for question, sampling in specs]
    for job, _ in jobs:
        worker.submit(job)
    worker.start(warmup=False)
    for _, events in jobs:
        assert wait_done(events)[0] == "done"
    worker.close()
    assert [job.batch_size for job, _ in jobs] == [4] * 4
    together = [job.stream.token_ids for job, _ in jobs]
    assert together[:3] == alone[:3]


# --- a real server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    model_dir = save_talkative_model(folder / "tiny")
    root = folder / "images"
    root.mkdir()
    noise_image(21, (112, 56)).save(root / "inside.png")
    noise_image(22, (56, 56)).save(folder / "secret.png")
    args = ["--api-key-env", "METEOR_TEST_KEY", "--image-root", str(root), "--queue-size", "16",
            "--max-batch-size", "8", "--batch-window-ms", "40", "--max-body-mb", "2", "--max-tokens-limit", "64",
            "--max-image-pixels", "1000000", "--no-ui"]
    with meteor_server(model_dir, args, env={"METEOR_TEST_KEY": KEY}) as (base, process, log):
        yield {"base": base, "model_dir": model_dir, "root": root, "log": log, "process": process}


@pytest.fixture(scope="module")
def local(served):
    """The same model in this process, to say what the server must answer."""
    return load_pretrained(served["model_dir"])


@pytest.fixture(scope="module")
def client(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=served["base"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def local_answer(local, question, image=None, k=None, max_tokens=8):
    model, processor = local
    sliced = [processor.prepare_image(image)] if image is not None else []
    conversation = Conversation()
    conversation.ask(question, sliced)
    ids = conversation.prompt_ids(processor, k)
    batch = processor.collate([(ids, ids)], sliced, padding_side="left")
    with torch.no_grad():
        out = model.generate(**batch.image_inputs(), input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             tokens_per_slice=k, max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=processor.tokenizer.pad_token_id, eos_token_id=processor.tokenizer.eos_token_id)
    tokens = out[0, batch.input_ids.shape[1]:].tolist()
    if processor.tokenizer.eos_token_id in tokens:
        tokens = tokens[:tokens.index(processor.tokenizer.eos_token_id) + 1]
    text = processor.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
    return text, len(ids), ids.count(processor.image_token_id), len(tokens)


def user(text, image=None):
    if image is None:
        return [{"role": "user", "content": text}]
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": data_url(png_bytes(image))}}]}]


@pytest.mark.slow
def test_the_openai_client_gets_models_answers_streams_images_and_usage(served, client, local):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].meteor["tokens_per_slice"] == 4

    plain = client.chat.completions.create(model="tiny", messages=user("What is in the image?"), max_tokens=8,
                                           temperature=0)
    text, prompt_tokens, visual, completion = local_answer(local, "What is in the image?")
    first = text
    assert plain.choices[0].message.content == text and plain.choices[0].message.role == "assistant"
    assert plain.object == "chat.completion" and plain.choices[0].finish_reason in ("stop", "length")
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens) == \
        (prompt_tokens, completion, prompt_tokens + completion)
    assert plain.usage.visual_tokens == visual == 0

    chunks = list(client.chat.completions.create(model="tiny", messages=user("What is in the image?"), max_tokens=8,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and all(c.object == "chat.completion.chunk" for c in chunks)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) >= 2 and "".join(pieces) == text
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == completion

    image = noise_image(30, (168, 112))
    seen = client.chat.completions.create(model="tiny", messages=user("Describe the image.", image), max_tokens=8,
                                          temperature=0)
    text, prompt_tokens, visual, completion = local_answer(local, "Describe the image.", image)
    assert seen.choices[0].message.content == text
    assert (seen.usage.prompt_tokens, seen.usage.visual_tokens, seen.usage.completion_tokens) == \
        (prompt_tokens, visual, completion) and visual == 4 * 7      # 2×3 slices + global, K = 4

    fewer = client.chat.completions.create(model="tiny", messages=user("Describe the image.", image), max_tokens=8,
                                           temperature=0, extra_body={"tokens_per_slice": 2, "return_selection": True})
    assert fewer.choices[0].message.content == local_answer(local, "Describe the image.", image, k=2)[0]
    assert fewer.usage.visual_tokens == 2 * 7 and fewer.meteor["tokens_per_slice"] == 2
    model, processor = local
    sliced = processor.prepare_image(image)
    _, selections = model.encode_images(**processor.image_inputs([sliced]), return_selection=True, tokens_per_slice=2)
    assert [(v["view"], v["is_global"], v["grid"], v["kept"]) for v in fewer.selection] == \
        [(s.view_index, s.is_global, list(s.grid), s.indices.tolist()) for s in selections]
    assert fewer.selection[-1]["region"] == [0, 0, 168, 112]

    inside = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Describe the image."}, {"type": "image_url", "image_url": {"url": "inside.png"}}]}],
        max_tokens=8, temperature=0)
    assert inside.choices[0].message.content == local_answer(local, "Describe the image.", noise_image(21, (112, 56)))[0]

    stopped = client.chat.completions.create(model="tiny", messages=user("What is in the image?"), max_tokens=8,
                                             temperature=0, stop=[first[2:4]])
    assert stopped.choices[0].message.content == first[:first.index(first[2:4])]
    assert stopped.choices[0].finish_reason == "stop"


@pytest.mark.slow
def test_sixteen_concurrent_requests_are_batched_and_answer_as_they_do_alone(served, client):
    import httpx

    sizes = [(56, 56), (112, 56), (56, 112), (112, 112), (168, 112), None, (80, 60), None]
    requests = []
    for index in range(16):
        size = sizes[index % len(sizes)]
        image = None if size is None else noise_image(100 + index, size)
        question = ["What is in the image?", "Describe the image.", "How many shapes are there?", "Which colour?"][index % 4]
        extra = {"tokens_per_slice": 2} if index in (3, 11) and image is not None else {}
        requests.append(dict(model="tiny", messages=user(f"{question} ({index})", image), temperature=0,
                             max_tokens=[8, 12][index % 2], extra_body=extra))

    def ask(request):
        return client.chat.completions.create(**request)

    alone = [ask(request) for request in requests]
    assert all(r.meteor["batch_size"] == 1 for r in alone)
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, requests))
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]
    assert [r.usage.completion_tokens for r in together] == [r.usage.completion_tokens for r in alone]
    assert len({r.choices[0].message.content for r in alone}) >= 12     # the answers do differ
    sizes_seen = [r.meteor["batch_size"] for r in together]
    assert max(sizes_seen) > 1, sizes_seen
    metrics = httpx.get(served["base"] + "/metrics?format=json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert any(int(size) > 1 for size in metrics["batch_sizes"]) and metrics["ready"]
    assert "batch of " in served["log"].read_text()


def post(served, payload=None, content=None, key=KEY, **kwargs):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        headers["Content-Type"] = "application/json"
    kwargs.setdefault("timeout", 60)
    return httpx.post(served["base"] + "/v1/chat/completions", json=payload, content=content, headers=headers,
                      **kwargs)


def image_message(url):
    return [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.mark.slow
def test_malformed_requests_get_the_right_4xx_and_the_server_keeps_serving(served, client):
    from PIL import Image
    openai = pytest.importorskip("openai")

    good = body(max_tokens=4, temperature=0)
    noisy = png_bytes(noise_image(40, (300, 300)))
    cases = {
        "bad JSON": (dict(content=b'{"model": "tiny", "messages": [}'), 400, None, "invalid_json"),
        "unknown role": (dict(payload={**good, "messages": [{"role": "wizard", "content": "hi"}]}), 400,
                         "messages[0].role", None),
        "missing content": (dict(payload={**good, "messages": [{"role": "user"}]}), 400, "messages[0].content", None),
        "broken base64": (dict(payload={**good, "messages": image_message("data:image/png;base64,#$%^")}), 400,
                          "messages[0].content[1].image_url", "invalid_base64"),
        "truncated image": (dict(payload={**good, "messages": image_message(data_url(noisy[:len(noisy) // 2]))}), 400,
                            "messages[0].content[1].image_url", "invalid_image"),
        "decompression bomb": (dict(payload={**good, "messages": image_message(data_url(png_bytes(Image.new("1", (4000, 4000)))))}),
                               400, "messages[0].content[1].image_url", "invalid_image"),
        "http URL": (dict(payload={**good, "messages": image_message("http://example.com/cat.png")}), 400,
                     "messages[0].content[1].image_url", "image_url_refused"),
        "path outside the root": (dict(payload={**good, "messages": image_message("../secret.png")}), 400,
                                  "messages[0].content[1].image_url", "image_path_refused"),
        "absolute path elsewhere": (dict(payload={**good, "messages": image_message("/etc/hostname")}), 400,
                                    "messages[0].content[1].image_url", "image_path_refused"),
        "max_tokens over the limit": (dict(payload={**good, "max_tokens": 65}), 400, "max_tokens", "max_tokens_exceeded"),
        "oversized body": (dict(payload={**good, "padding": "x" * 2_100_000}), 413, None, "request_too_large"),
        "wrong API key": (dict(payload=good, key="not-the-key"), 401, None, "invalid_api_key"),
        "no API key": (dict(payload=good, key=None), 401, None, "invalid_api_key"),
        "unknown model": (dict(payload={**good, "model": "gpt-4o"}), 404, "model", "model_not_found"),
        "K′ above a view's patches": (dict(payload={**good, "messages": image_message(data_url(png_bytes(noise_image(1)))),
                                                    "tokens_per_slice": 17}), 400, "tokens_per_slice", None),
        "the image placeholder in text": (dict(payload={**good, "messages": [{"role": "user", "content": "<image> hi"}]}),
                                          400, "messages", None),
    }
    for name, (request, status, param, code) in cases.items():
        response = post(served, **request)
        assert response.status_code == status, (name, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], name
        assert (error["param"], error["code"]) == (param, code), (name, error)
    assert "truncated" in post(served, **cases["truncated image"][0]).json()["error"]["message"]
    assert "16,000,000 pixels" in post(served, **cases["decompression bomb"][0]).json()["error"]["message"]

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served["base"] + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=user("hi"), max_tokens=1000)
    import httpx

    missing = httpx.get(served["base"] + "/v1/nowhere", headers={"Authorization": f"Bearer {KEY}"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"
    assert post(served, good).status_code == 200
    assert served["process"].poll() is None


@pytest.mark.slow
def test_a_full_queue_answers_429_and_then_serves_again(served):
    # 8 generating and 16 waiting at most: of 36 sent at once, some must be turned away
    flood = body(messages=[{"role": "user", "content": "Describe everything in great detail. " * 4}],
                 max_tokens=24, temperature=0)
    with ThreadPoolExecutor(36) as pool:
        responses = list(pool.map(lambda _: post(served, flood, timeout=240), range(36)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and statuses.count(429) >= 1 and statuses.count(200) >= 9, statuses
    error = next(r for r in responses if r.status_code == 429).json()["error"]
    assert error["code"] == "queue_full" and "--queue-size" in error["message"]
    assert post(served, body(max_tokens=4, temperature=0)).status_code == 200


@pytest.mark.slow
def test_health_and_metrics(served):
    import httpx

    health = httpx.get(served["base"] + "/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "model": "tiny"}
    assert httpx.get(served["base"] + "/metrics").status_code == 401
    metrics = httpx.get(served["base"] + "/metrics?format=json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert metrics["max_batch_size"] == 8 and metrics["queue_size"] == 16 and metrics["warmup_seconds"] > 0
    assert "warm-up done" in served["log"].read_text()


def test_serve_refuses_a_missing_api_key_variable(tmp_path, monkeypatch):
    from meteor.serve.config import ServeConfig
    from meteor.serve.server import api_key

    monkeypatch.delenv("METEOR_NO_SUCH_KEY", raising=False)
    with pytest.raises(ValueError, match="METEOR_NO_SUCH_KEY"):
        api_key(ServeConfig(api_key_env="METEOR_NO_SUCH_KEY"))
    monkeypatch.setenv("METEOR_SOME_KEY", " k ")
    assert api_key(ServeConfig(api_key_env="METEOR_SOME_KEY")) == "k"
    with pytest.raises(ValueError, match="max_batch_size"):
        ServeConfig(max_batch_size=0)
    assert ServeConfig().host == "127.0.0.1" and ServeConfig().max_body_bytes == 20_000_000


def test_meteor_serve_help_lists_every_limit(capsys):
    from meteor.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--image-root", "--api-key-env", "--max-batch-size", "--batch-window-ms",
                 "--queue-size", "--max-body-mb", "--max-image-pixels", "--limit-images-per-request",
                 "--max-prompt-tokens", "--max-tokens-limit", "--request-timeout", "--worker", "--no-ui"):
        assert flag in out, flag
