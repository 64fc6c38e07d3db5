"""A tiny WebSocket client for trying a gateway: ``python -m gatewayd.client URL [MESSAGE ...]``.

Sends each MESSAGE (or each line of standard input when none are given) and
prints what comes back. ``--cafile`` trusts an extra CA (the demo's dev CA).
"""

from __future__ import annotations

import argparse
import ssl
import sys
from collections.abc import Sequence

import trio
from trio_websocket import ConnectionClosed, HandshakeError, open_websocket_url


async def _talk(url: str, messages: Sequence[str], cafile: str | None, timeout: float) -> int:
    context = ssl.create_default_context(cafile=cafile) if url.startswith("wss://") else None
    try:
        with trio.fail_after(timeout):
            async with open_websocket_url(url, ssl_context=context) as ws:
                for message in messages:
                    await ws.send_message(message)
                    reply = await ws.get_message()
                    print(reply if isinstance(reply, str) else reply.hex())
    except HandshakeError as exc:
        print(f"handshake failed: {exc}", file=sys.stderr)
        return 1
    except (ConnectionClosed, OSError, ssl.SSLError) as exc:
        print(f"connection failed: {exc}", file=sys.stderr)
        return 1
    except trio.TooSlowError:
        print(f"no answer within {timeout}s", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gatewayd.client", description=__doc__)
    parser.add_argument("url", help="ws:// or wss:// URL")
    parser.add_argument("messages", nargs="*", help="messages to send (default: stdin lines)")
    parser.add_argument("--cafile", help="PEM file of extra CA certificates to trust")
    parser.add_argument("--timeout", type=float, default=10.0, help="overall time limit (s)")
    # Intermixed: `URL --cafile CA MESSAGE` (as the demo prints it) must work;
    # plain parse_args binds the empty MESSAGE list right after URL.
    args = parser.parse_intermixed_args(argv)
    messages = args.messages or [line.rstrip("\n") for line in sys.stdin]
    return trio.run(_talk, args.url, messages, args.cafile, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
