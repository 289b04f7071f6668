"""The web UI of ``meteor serve`` at ``/ui`` (Gradio, mounted on the same FastAPI app).

Upload an image, chat about it, choose the visual tokens kept per view (K′) with a slider; beside
each answer, the paper's Figure 4 for the newest image: the patches the visual expert, the native
expert and their aggregate (what the model kept) keep on every view (``meteor.serve.visualize``). The UI
goes through the same worker, queue and limits as the API. It is served from Gradio's bundled
frontend with system fonts and analytics off, so a browser needs nothing from the internet.
"""

from __future__ import annotations

import copy
import hmac
import os
import tempfile
import time
import uuid
from pathlib import Path

from meteor.processing.conversation import ConversationError
from meteor.processing.images import ImageError, load_image
from meteor.serve.streaming import Conversation, Sampling
from meteor.serve.protocol import APIError, ChatRequest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

UPDATE_EVERY = 0.1
"""Seconds between updates of a streaming answer in the browser (each sends the conversation)."""

SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]
MONO_FONTS = ["ui-monospace", "monospace"]


def _figure(server, sliced, selections, folder: Path) -> str:
    """The newest image's Figure 4 as a PNG in ``folder``; its path."""
    from meteor.serve.visualize import _plt, draw_selection

    plt = _plt()
    fig = draw_selection(sliced, selections, server.processor, by_view="columns")
    path = folder / f"selection-{uuid.uuid4().hex[:12]}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)


def build_ui(server):
    """The Gradio Blocks of the UI."""
    import gradio as gr

    compressor = server.processor.config.compressor
    trained = compressor.tokens_per_slice
    patches = (server.processor.base_size // server.processor.patch_size) ** 2
    adjustable = trained is not None and compressor.projector not in ("mlp", "resampler")
    figures = Path(tempfile.mkdtemp(prefix="meteor-ui-"))

    async def respond(question: str, image_path: str | None, k: float, max_tokens: float,
                      history: list, state: dict):
        question = (question or "").strip()
        if not question:
            yield history, state, gr.update(), gr.update(), gr.update()
            return
        state = copy.copy(state)
        conversation: Conversation = copy.deepcopy(state["conversation"])
        new_image = bool(image_path) and image_path != state.get("image_path")
        history = list(history) + [{"role": "user", "content": question}]
        try:
            images = []
            if new_image:
                picture = await server.off_loop(load_image, image_path, max_pixels=server.config.max_image_pixels)
                images = [await server.off_loop(server.processor.prepare_image, picture)]
            conversation.ask(question, images, server.processor.config.image_token)
            tokens = int(k) if adjustable else None
            prompt = await server.off_loop(server.layout, conversation, tokens)
            request = ChatRequest(model=server.model_name, messages=[], max_tokens=int(max_tokens), sampling=Sampling(),
                                  stream=True)
            ticket, events = server.submit(prompt, request, time.monotonic() + server.config.request_timeout,
                                           want_selection=bool(conversation.images))
        except (APIError, ImageError, ConversationError) as err:
            message = err.message if isinstance(err, APIError) else str(err)
            yield history + [{"role": "assistant", "content": f"⚠️ {message}"}], state, "", "", gr.update()
            return
        history.append({"role": "assistant", "content": ""})
        yield history, state, "", "", gr.update()
        shown = 0.0
        while True:
            kind, value = await events.get()
            while kind == "text" and not events.empty():     # the browser gets the text so far, not every token
                kind, value = events.get_nowait()
            if kind == "error":
                history[-1] = {"role": "assistant", "content": f"⚠️ {value.message}"}
                yield history, state, "", "", gr.update()
                return
            if kind == "done":
                break
            if time.monotonic() - shown >= UPDATE_EVERY:
                shown = time.monotonic()
                history[-1] = {"role": "assistant", "content": ticket.text}
                yield history, state, "", "", gr.update()
        conversation.answer(ticket.text)
        history[-1] = {"role": "assistant", "content": ticket.text or "(empty answer)"}
        state.update(conversation=conversation, image_path=image_path if new_image else state.get("image_path"))
        counts = server.counts(ticket)
        used = prompt.tokens_per_slice if prompt.tokens_per_slice is not None else trained
        stats = (f"{counts['visual_tokens']} visual tokens (K′={used} per view) · {counts['completion_tokens']} "
                 f"answer tokens · encode {ticket.encode_seconds or 0:.2f} s · batch of {ticket.batch_size} · "
                 f"finish: {ticket.finish_reason}")
        path = None
        if ticket.selection:
            newest = len(conversation.images) - 1
            mine = [s for s in ticket.selection if s.image_index == newest]
            path = await server.off_loop(_figure, server, conversation.images[newest], mine, figures)
            history.append({"role": "assistant", "content": gr.Image(path, label="kept patches", show_label=True)})
        yield history, state, "", stats, path

    def reset():
        return [], {"conversation": Conversation(), "image_path": None}, "", "", None

    with gr.Blocks(title="LLaVA-Meteor") as ui:
        gr.Markdown(f"## LLaVA-Meteor · `{server.model_name}`\nUpload an image, ask about it. Beside each "
                    "answer: which patches the visual expert, the native expert and their aggregate kept "
                    "(the paper's Figure 4).")
        state = gr.State({"conversation": Conversation(), "image_path": None})
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", label="image", sources=["upload"], elem_id="meteor-image")
                k = gr.Slider(1, patches, value=trained or patches, step=1, interactive=adjustable,
                              label=f"visual tokens per slice K′ (trained: {trained or 'all'}, of ≤ {patches})",
                              elem_id="meteor-tokens-per-slice")
                max_tokens = gr.Slider(1, server.config.max_tokens_limit, value=min(128, server.config.max_tokens_limit),
                                       step=1, label="max new tokens", elem_id="meteor-max-tokens")
                clear = gr.Button("New conversation", elem_id="meteor-reset")
            with gr.Column(scale=2):
                chat = gr.Chatbot(label="conversation", elem_id="meteor-chat", height=560)
                with gr.Row():
                    question = gr.Textbox(show_label=False, placeholder="Ask about the image", scale=4,
                                          elem_id="meteor-question")
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="meteor-send")
                stats = gr.Markdown(elem_id="meteor-stats")
        selection = gr.Image(label="kept patches of the latest answer (faded: dropped, red outline: kept): visual "
                             "expert, native expert, aggregate (what the LLM sees), one column per view",
                             interactive=False, elem_id="meteor-selection")
        inputs = [question, image, k, max_tokens, chat, state]
        outputs = [chat, state, question, stats, selection]
        send.click(respond, inputs, outputs)
        question.submit(respond, inputs, outputs)
        clear.click(reset, None, outputs)
    return ui


def mount_ui(app, server):
    """Mount the UI at /ui (with the API key as its password when the server has one)."""
    import gradio as gr

    auth = None
    if server.api_key is not None:
        def auth(username: str, password: str) -> bool:
            return hmac.compare_digest(password.encode(), server.api_key.encode())
    theme = gr.themes.Default(font=SYSTEM_FONTS, font_mono=MONO_FONTS)
    return gr.mount_gradio_app(app, build_ui(server), path="/ui", auth=auth, theme=theme,
                               max_file_size=server.config.max_body_bytes, ssr_mode=False, footer_links=[],
                               auth_message="Password: the server's API key (any user name)." if auth else None)

