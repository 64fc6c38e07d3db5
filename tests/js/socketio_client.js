// socket.io-client with its default transports (HTTP long-polling first, then
// the upgrade to WebSocket), through the gateway: node socketio_client.js URL.
// Trusts the test CA through NODE_EXTRA_CA_CERTS. Prints one JSON line.
"use strict";
const { io } = require("socket.io-client");

const url = process.argv[2];
const socket = io(url, { reconnection: false, timeout: 10000 });
const result = { first: null, upgraded: null, echo: null, last: null };
const finish = (code, error) => {
  if (error) result.error = String(error);
  process.stdout.write(JSON.stringify(result) + "\n");
  socket.close();
  process.exit(code);
};
setTimeout(() => finish(1, "timed out"), 20000);

socket.on("connect_error", (error) => finish(1, error.message));

// The engine opens on polling; the upgrade and socket.io's "connect" may then
// come in either order: the echo goes out once both happened.
let connected = false;
let sent = false;
const send = () => {
  if (!connected || result.upgraded === null || sent) return;
  sent = true;
  const engine = socket.io.engine;
  socket.emit("echo", { text: "through gatewayd", big: "x".repeat(100000) }, (answer) => {
    result.echo = { text: answer.payload.text, size: answer.payload.big.length, transport: answer.transport };
    result.last = engine.transport.name;
    finish(0);
  });
};
socket.io.on("open", () => {
  const engine = socket.io.engine;
  result.first = engine.transport.name;
  engine.once("upgrade", (transport) => {
    result.upgraded = transport.name;
    send();
  });
});
socket.on("connect", () => {
  connected = true;
  send();
});
