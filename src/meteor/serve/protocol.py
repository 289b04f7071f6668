"""OpenAI's chat-completions protocol: requests read and checked, responses and stream chunks built.

A request is checked field by field before any work is done, and each problem is an ``APIError``
whose ``param`` names the field as OpenAI does (``messages[1].content[0].image_url``), so a client
sees what was wrong. What is read:

- ``messages``: roles ``system`` / ``developer`` (their text goes before the first user message:
  the model's template has its own system prompt), ``user``, ``assistant``; ``content`` a string
  or a list of ``{"type": "text", "text"}`` and ``{"type": "image_url", "image_url": {"url"}}``
  parts (images in user messages only; each image goes before its message's text, as LLaVA
  trains). Consecutive messages of one role are joined; the last must be the user's.
- ``max_tokens`` (or ``max_completion_tokens``), ``temperature`` (OpenAI's default 1; 0 is greedy),
  ``top_p``, ``stop`` (a string or up to 4), ``seed``, ``n`` (1 only), ``stream`` and
  ``stream_options.include_usage``.
- Extensions: ``tokens_per_slice`` (K′ visual tokens per view for this request; default the
  model's K) and ``return_selection`` (the kept patch indices per view, in the response's
  ``selection``).
- Refused when asked for: tools, logprobs, JSON response formats, logit biases (not implemented);
  other fields (``user``, ``metadata``, penalties, …) are accepted and ignored.
"""

from __future__ import annotations

import reprlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from meteor.serve.streaming import Sampling


class APIError(Exception):
    """A request the server will not run: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers
        """Response headers to send with it (``Retry-After`` on a 429 or 503)."""

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``, as OpenAI answers."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param, code)


@dataclass(frozen=True)
class ImagePart:
    url: str
    param: str
    """Where the URL was in the request, for error messages."""


@dataclass
class Message:
    role: str
    """"human" or "gpt" (LLaVA's names)."""
    text: str
    images: list[ImagePart] = field(default_factory=list)


@dataclass
class ChatRequest:
    """A checked chat-completions request."""

    model: str
    messages: list[Message]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    tokens_per_slice: int | None = None
    return_selection: bool = False


ROLES = {"system": "system", "developer": "system", "user": "human", "assistant": "gpt"}
UNSUPPORTED = {"tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
               "function_call": "function calls", "logprobs": "log probabilities",
               "top_logprobs": "log probabilities", "logit_bias": "logit biases", "audio": "audio output",
               "prediction": "predicted outputs"}
"""Fields of features this server does not have: refused when set to anything but their 'off' value."""


def parse_chat_request(payload: Any, model_name: str, max_tokens_limit: int,
                       max_images: int | None = None) -> ChatRequest:
    """Check an OpenAI chat-completions body (parsed JSON) against the protocol and the limits
    (``max_images``: the most images one request may carry; None: no limit)."""
    if not isinstance(payload, dict):
        raise invalid(f"the request body must be a JSON object, got {type(payload).__name__}")
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("'model' is required: the model's id, as GET /v1/models lists it", "model")
    if model != model_name:
        raise APIError(404, f"the model {_show(model)} does not exist here: this server serves {model_name!r}",
                       "model", "model_not_found")
    for name, feature in UNSUPPORTED.items():
        if payload.get(name) not in (None, False, [], {}, "none"):
            raise invalid(f"{feature} ('{name}') are not supported by this server", name, "unsupported_parameter")
    response_format = payload.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise invalid("only text responses are supported ('response_format' must be {\"type\": \"text\"})",
                      "response_format", "unsupported_parameter")
    n = payload.get("n", 1)
    if n not in (None, 1) or isinstance(n, bool):
        raise invalid(f"only one choice per request is supported ('n' must be 1, got {_show(n)})", "n")

    max_tokens = payload.get("max_completion_tokens", payload.get("max_tokens"))
    which = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
    if max_tokens is None:
        max_tokens = max_tokens_limit
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise invalid(f"'{which}' must be a whole number ≥ 1, got {_show(max_tokens)}", which)
    elif max_tokens > max_tokens_limit:
        raise invalid(f"'{which}' is {max_tokens}, above this server's limit of {max_tokens_limit} "
                      f"(meteor serve --max-tokens-limit)", which, "max_tokens_exceeded")
    temperature = _number(payload, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(payload, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise invalid("'top_p' must be above 0 (1 keeps every token)", "top_p")
    seed = payload.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_RANGE[0] <= seed <= SEED_RANGE[1]):
        raise invalid(f"'seed' must be a whole number that fits in 64 bits (from {SEED_RANGE[0]} to "
                      f"{SEED_RANGE[1]}), got {_show(seed)}", "seed")
    stream = _flag(payload, "stream")
    options = payload.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        raise invalid("'stream_options' must be an object such as {\"include_usage\": true}", "stream_options")
    k = payload.get("tokens_per_slice")
    if k is not None and (not _is_int(k) or k < 1):
        raise invalid(f"'tokens_per_slice' must be a whole number ≥ 1 (visual tokens kept per view), got {_show(k)}",
                      "tokens_per_slice")
    messages = parse_messages(payload.get("messages"))
    images = sum(len(message.images) for message in messages)
    if max_images is not None and images > max_images:
        raise invalid(f"the request carries {images} images, above this server's limit of {max_images} per "
                      f"request (meteor serve --limit-images-per-request); send fewer images, or ask about "
                      f"them in separate requests", "messages", "too_many_images")
    return ChatRequest(model=model, messages=messages, max_tokens=max_tokens,
                       sampling=Sampling(temperature, top_p, seed), stop=_stop(payload.get("stop")), stream=stream,
                       include_usage=bool(stream and options and options.get("include_usage")),
                       tokens_per_slice=k, return_selection=_flag(payload, "return_selection"))


def parse_messages(messages: Any) -> list[Message]:
    """OpenAI messages → alternating human / gpt messages ending with a human one (system text
    goes before the first user message)."""
    if messages is None:
        raise invalid("'messages' is required: a list of {\"role\", \"content\"} objects", "messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    system: list[str] = []
    out: list[Message] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise invalid(f"{where} must be an object with 'role' and 'content'", where)
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role is {_show(role)}; use one of {', '.join(ROLES)}", f"{where}.role")
        if "content" not in message or message["content"] is None:
            raise invalid(f"{where}.content is missing: give the message's text (or a list of parts)",
                          f"{where}.content")
        text, images = _content(message["content"], f"{where}.content")
        if images and ROLES[role] != "human":
            raise invalid(f"{where} is a {role} message with an image: images go in user messages",
                          f"{where}.content")
        if ROLES[role] == "system":
            system.append(text)
            continue
        role = ROLES[role]
        if out and out[-1].role == role:
            out[-1].text = "\n".join(t for t in (out[-1].text, text) if t)
            out[-1].images += images
        else:
            out.append(Message(role, text, images))
    if not out or out[0].role != "human":
        raise invalid("the conversation must start with a user message (after any system message)", "messages")
    if out[-1].role != "human":
        raise invalid("the last message must be the user's: it is the one answered", "messages")
    if system:
        out[0].text = "\n\n".join(system + ([out[0].text] if out[0].text else []))
    return out


def _content(content: Any, where: str) -> tuple[str, list[ImagePart]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise invalid(f"{where} must be a string or a list of content parts", where)
    texts, images = [], []
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise invalid(f"{at}.text must be a string", f"{at}.text")
            texts.append(part["text"])
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise invalid(f"{at}.image_url must be {{\"url\": \"data:image/png;base64,...\"}}", f"{at}.image_url")
            images.append(ImagePart(url, f"{at}.image_url"))
        else:
            raise invalid(f"{at}.type is {_show(kind)}; this server reads 'text' and 'image_url' parts", f"{at}.type")
    return "\n".join(texts), images


SEED_RANGE = (-2 ** 63, 2 ** 63 - 1)
"""Seeds a request may give: OpenAI's seed is a 64-bit integer, and so is torch's."""

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlong = 2, 60, 60, 4, 4, 40


def _show(value: Any) -> str:
    """A client's value in an error message, cut short (a field may hold megabytes, or nest deep)."""
    return _SHORT.repr(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(payload: dict, name: str, default: float, low: float, high: float) -> float:
    value = payload.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise invalid(f"'{name}' must be a number from {low:g} to {high:g}, got {_show(value)}", name)
    return float(value)


def _flag(payload: dict, name: str) -> bool:
    value = payload.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false, got {_show(value)}", name)
    return value


def _stop(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise invalid(f"'stop' must be a non-empty string or a list of up to 4, got {_show(stop)}", "stop")
    return tuple(stops)


# --- responses -----------------------------------------------------------------------------------

def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, visual_tokens: int) -> dict[str, int]:
    """OpenAI's usage counts, plus ``visual_tokens`` (the image tokens among the prompt tokens)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "visual_tokens": visual_tokens}


def completion(id_: str, model: str, text: str, finish_reason: str, counts: dict[str, int],
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": counts, **(extra or {})}


def chunk(id_: str, model: str, created: int, delta: dict[str, Any] | None, finish_reason: str | None = None,
          counts: dict[str, int] | None = None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``: a delta (None: the usage chunk, which has no choices)."""
    body: dict[str, Any] = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
                            "system_fingerprint": None}
    body["choices"] = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}]
    if counts is not None:
        body["usage"] = counts
    return {**body, **(extra or {})}
