"""Micro-benchmark: what translating a stream costs per event (edge.adapters' translators).

    python bench/bench_translate.py            # 20 streams of 2,000 events per direction
    python bench/bench_translate.py --n 200    # smoke run

Each direction feeds a whole stream to its translator as the relay hands it over, a few events
per block: **to_openai** an Anthropic message of N text deltas (EventsToChunks, with the usage
chunk asked for), **to_anthropic** an OpenAI chunk stream of N content chunks with its usage
chunk (ChunksToEvents). Prints µs per event for each, the best of the runs. Target: ≤ 3 µs per
streamed event (issue #24). The non-streamed cost is bench/run.py's translate phase.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge.adapters.stream_to_anthropic import ChunksToEvents
from edge.adapters.stream_to_openai import EventsToChunks

TARGET_US = 3.0
PER_BLOCK = 4  # events the relay hands over at once (whole events, several per read)


def sse(payload: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def anthropic_stream(n: int) -> list[bytes]:
    message = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
               "content": [], "stop_reason": None, "usage": {"input_tokens": 9,
                                                             "output_tokens": 1}}  # fmt: skip
    events = [
        sse({"type": "message_start", "message": message}, "message_start"),
        sse({"type": "content_block_start", "index": 0,
             "content_block": {"type": "text", "text": ""}}, "content_block_start"),
    ]  # fmt: skip
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}}
    for index in range(n):
        events.append(
            sse({**delta, "delta": {"type": "text_delta", "text": f" word{index}"}},
                "content_block_delta")
        )  # fmt: skip
    events += [
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
             "usage": {"output_tokens": n}}, "message_delta"),
        sse({"type": "message_stop"}, "message_stop"),
    ]  # fmt: skip
    return events


def openai_stream(n: int) -> list[bytes]:
    head = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict, finish: str | None = None) -> bytes:
        return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": f" word{index}"}) for index in range(n)]
    events.append(chunk({}, "stop"))
    usage = {"prompt_tokens": 9, "completion_tokens": n}
    events.append(sse({**head, "choices": [], "usage": usage}))
    events.append(b"data: [DONE]\n\n")
    return events


def blocks(events: list[bytes]) -> list[bytes]:
    return [b"".join(events[at : at + PER_BLOCK]) for at in range(0, len(events), PER_BLOCK)]


def per_event(make, stream: list[bytes], events: int, runs: int) -> float:
    best = float("inf")
    for _ in range(runs):
        translator = make()
        started = time.perf_counter()
        for block in stream:
            translator.feed(block)
        best = min(best, (time.perf_counter() - started) / events * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000, help="events per stream")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    to_openai = anthropic_stream(args.n)
    to_anthropic = openai_stream(args.n)
    openai_us = per_event(
        lambda: EventsToChunks(include_usage=True), blocks(to_openai), len(to_openai), args.runs
    )
    anthropic_us = per_event(ChunksToEvents, blocks(to_anthropic), len(to_anthropic), args.runs)
    print(f"translate per event to_openai {openai_us:.2f} µs to_anthropic {anthropic_us:.2f} µs")


if __name__ == "__main__":
    main()
