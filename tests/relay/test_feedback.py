"""The frames a waiting request gets, by protocol: their shape, the text saying where the job
stands, the visible note once per change, and which requests get any."""

from __future__ import annotations

import json

from aiohttp.test_utils import make_mocked_request

from mgpumanager.registry import HttpCall, StreamDetect
from mgpumanager.relay.feedback import (
    Feedback,
    FeedbackPlan,
    FrameKind,
    WaitState,
    declares_stream,
    streamed_kind,
    wait_text,
)


def frames(kind: FrameKind, states: list[WaitState], *, notice: bool = True) -> list[bytes]:
    request = make_mocked_request("POST", "/x")
    plan = FeedbackPlan(kind, 1.0, model="qwen2.5:14b", loading_notice=notice, keepalive=b": k\n\n")
    it = iter(states)
    feedback = Feedback(request, plan, lambda job, stage: next(it), "ollama")
    return [feedback._frame() for _ in states]


def test_the_text_says_position_holder_and_expected_start() -> None:
    queued = wait_text(
        "queued",
        consumer="ollama",
        model="qwen2.5:14b",
        position=2,
        expected_start_s=14.2,
        holder="comfyui",
    )
    assert queued.text == "queued, 2 ahead, waiting for comfyui to finish, starts in ~14 s"
    assert queued.key == "queued, 2 ahead, waiting for comfyui to finish"  # no seconds
    loading = wait_text(
        "loading", consumer="ollama", model=None, position=None, expected_start_s=None, holder=None
    )
    assert loading == WaitState("loading ollama", "loading ollama")


def test_ollama_frames_are_empty_chunks_and_the_note_comes_once_per_change() -> None:
    a, b = WaitState("queued, 1 ahead", "queued, 1 ahead"), WaitState("loading m", "loading m")
    lines = [json.loads(f) for f in frames(FrameKind.OLLAMA_CHAT, [a, a, b])]
    assert all(line["done"] is False and line["message"]["content"] == "" for line in lines)
    assert [line["message"].get("thinking") for line in lines] == [
        "queued, 1 ahead\n",
        None,
        "loading m\n",
    ]
    [generate] = [json.loads(f) for f in frames(FrameKind.OLLAMA_GENERATE, [a], notice=False)]
    assert generate["response"] == "" and "thinking" not in generate
    assert generate["model"] == "qwen2.5:14b"


def test_openai_frames_are_sse_comments_and_generic_ones_the_keepalive() -> None:
    state = WaitState("queued, 0 ahead", "queued, 0 ahead, starts in ~3 s")
    [comment] = frames(FrameKind.OPENAI_COMPLETIONS, [state])
    assert comment == b": queued, 0 ahead, starts in ~3 s\n\n"
    [chat] = frames(FrameKind.OPENAI_CHAT, [state])
    first, data, _ = chat.split(b"\n\n")
    assert first == b": queued, 0 ahead, starts in ~3 s"
    delta = json.loads(data.removeprefix(b"data: "))["choices"][0]["delta"]
    assert delta == {"reasoning_content": "queued, 0 ahead, starts in ~3 s\n"}
    assert frames(FrameKind.GENERIC, [state]) == [b": k\n\n"]
    assert frames(FrameKind.JSON, [state]) == [b"\n"]


def test_which_requests_stream() -> None:
    assert streamed_kind("/api/chat") is FrameKind.OLLAMA_CHAT
    assert streamed_kind("/v1/chat/completions?x=1") is FrameKind.OPENAI_CHAT
    assert streamed_kind("/v1/completions") is FrameKind.OPENAI_COMPLETIONS
    assert streamed_kind("/v1/embeddings") is None
    always = HttpCall(path="/s", streams=True)
    detect = HttpCall(path="/r", stream_detect=StreamDetect(field="stream"))
    assert declares_stream(always, None)
    assert declares_stream(detect, {"stream": True})
    assert not declares_stream(detect, {"stream": False}) and not declares_stream(detect, None)
