"""Benchmark: the bridge's frame path, CPU time per message, for each candidate codec.

What the tcp:// bridge does per message, with no I/O at all (the sockets and
TLS cost the same whichever codec parses):

  up     client -> server: masked frames as a browser sends them, parsed,
         unmasked and (text) UTF-8 validated; the payload handed on as bytes.
         Fed in reads of at most 16 KiB (splice.CHUNK), as the data plane
         reads them; 64 KiB messages therefore arrive in four reads, and the
         fragmented row is a 64 KiB message in 16 frames of 4 KiB.
  down   server -> client: one binary frame built around a payload (what
         the bridge does for each read from TCP).

Candidates:

  wsproto     wsproto.Connection (today's gatewayd.bridge): events per frame
              piece, pure-Python unmasking and framing.
  websockets  the websockets package's sans-I/O layer: websockets.protocol.
              Protocol in state OPEN, its frames.Frame parser with the C
              apply_mask of websockets.speedups, plus an incremental UTF-8
              decoder for text (Protocol leaves text validation to its
              I/O layers). NB: it reads a frame whole before yielding it, so
              it holds up to max_size per connection (not streamed).
  engine      gatewayd.wsbridge.BridgeEngine: its own streaming parser with
              wsproto's checks, websockets.speedups.apply_mask, the codec's
              incremental UTF-8 decoder; frames built into a bytearray.

Run: .venv/bin/python bench/frames.py [--quick]. Prints median CPU
microseconds per message (process time; min in brackets) over 5 runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side, State
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, TextMessage

from gatewayd.wsbridge import BridgeEngine

CHUNK = 16384
KIB = 1024


def client_frames(size: int, text: bool, fragments: int = 1) -> bytes:
    """One masked client message of ``size`` bytes (ASCII if text) in ``fragments`` frames."""
    payload = (b"abcdefgh" * (size // 8 + 1))[:size] if text else os.urandom(size)
    step = size // fragments
    out = bytearray()
    for index in range(fragments):
        part = payload[index * step : (index + 1) * step]
        opcode = (Opcode.TEXT if text else Opcode.BINARY) if index == 0 else Opcode.CONT
        out += Frame(opcode, part, fin=index == fragments - 1).serialize(mask=True, extensions=[])
    return bytes(out)


def reads(wire: bytes) -> list[bytes]:
    return [wire[i : i + CHUNK] for i in range(0, len(wire), CHUNK)]


# ------------------------------------------------------------------ up: one message, its reads


def up_wsproto(chunks: list[bytes]) -> Callable[[], None]:
    ws = Connection(ConnectionType.SERVER)

    def run() -> None:
        for chunk in chunks:
            ws.receive_data(chunk)
            for event in ws.events():
                if isinstance(event, TextMessage):
                    event.data.encode()
                elif isinstance(event, BytesMessage):
                    bytes(event.data)

    return run


def up_websockets(chunks: list[bytes]) -> Callable[[], None]:
    import codecs

    proto = Protocol(Side.SERVER, state=State.OPEN, max_size=None)
    decoder: list[codecs.IncrementalDecoder] = []

    def run() -> None:
        for chunk in chunks:
            proto.receive_data(chunk)
            for frame in proto.events_received():
                if frame.opcode is Opcode.TEXT:
                    decoder[:] = [codecs.getincrementaldecoder("utf-8")()]
                if decoder and frame.opcode in (Opcode.TEXT, Opcode.CONT):
                    decoder[0].decode(frame.data, frame.fin)
                if frame.fin:
                    decoder.clear()

    return run


def up_engine(chunks: list[bytes]) -> Callable[[], None]:
    engine = BridgeEngine(max_message_size=1 << 30)

    def run() -> None:
        for chunk in chunks:
            engine.client_data(chunk)
            engine.to_backend.clear()

    return run


# ------------------------------------------------------------------ down: one frame


def down_wsproto(payload: bytes) -> Callable[[], None]:
    ws = Connection(ConnectionType.SERVER)

    def run() -> None:
        ws.send(BytesMessage(data=payload))

    return run


def down_websockets(payload: bytes) -> Callable[[], None]:
    proto = Protocol(Side.SERVER, state=State.OPEN, max_size=None)

    def run() -> None:
        proto.send_binary(payload)
        proto.data_to_send()

    return run


def down_engine(payload: bytes) -> Callable[[], None]:
    engine = BridgeEngine(max_message_size=1 << 30)

    def run() -> None:
        engine.backend_data(payload)
        engine.to_client.clear()

    return run


def measure(run: Callable[[], None], budget: float) -> tuple[float, float]:
    """Median and min CPU µs per call over 5 runs of about ``budget`` seconds each."""
    start = time.process_time()
    count = 0
    while time.process_time() - start < 0.05:
        run()
        count += 1
    per_run = max(1, int(count * budget / 0.05))
    figures = []
    for _ in range(5):
        start = time.process_time_ns()
        for _ in range(per_run):
            run()
        figures.append((time.process_time_ns() - start) / per_run / 1000)
    return statistics.median(figures), min(figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.05 s per run instead of 0.3")
    budget = 0.05 if parser.parse_args().quick else 0.3
    codecs_up = {"wsproto": up_wsproto, "websockets": up_websockets, "engine": up_engine}
    codecs_down = {"wsproto": down_wsproto, "websockets": down_websockets, "engine": down_engine}
    up_rows = [
        ("64 B binary", client_frames(64, False)),
        ("64 B text", client_frames(64, True)),
        ("1 KiB binary", client_frames(KIB, False)),
        ("1 KiB text", client_frames(KIB, True)),
        ("64 KiB binary", client_frames(64 * KIB, False)),
        ("64 KiB text", client_frames(64 * KIB, True)),
        ("64 KiB binary, 16 fragments", client_frames(64 * KIB, False, 16)),
        ("64 KiB text, 16 fragments", client_frames(64 * KIB, True, 16)),
    ]
    names = list(codecs_up)
    print("CPU µs per message, median of 5 runs [min]")
    print(f"{'up (client -> server)':32}" + "".join(f"{name:>20}" for name in names))
    for label, wire in up_rows:
        chunks = reads(wire)
        cells = []
        for name in names:
            median, low = measure(codecs_up[name](chunks), budget)
            cells.append(f"{median:10.2f} [{low:.2f}]")
        print(f"{label:32}" + "".join(f"{cell:>20}" for cell in cells))
    print(f"{'down (server -> client)':32}" + "".join(f"{name:>20}" for name in names))
    for label, size in (("64 B", 64), ("1 KiB", KIB), ("16 KiB (one CHUNK)", 16 * KIB), ("64 KiB", 64 * KIB)):
        payload = os.urandom(size)
        cells = []
        for name in names:
            median, low = measure(codecs_down[name](payload), budget)
            cells.append(f"{median:10.2f} [{low:.2f}]")
        print(f"{label:32}" + "".join(f"{cell:>20}" for cell in cells))


if __name__ == "__main__":
    main()
