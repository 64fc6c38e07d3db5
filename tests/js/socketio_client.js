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
socket.on("connect", () => {
  const engine = socket.io.engine;
  result.first = engine.transport.name;
  const send = () => {
    socket.emit("echo", { text: "through gatewayd", big: "x".repeat(100000) }, (answer) => {
      result.echo = { text: answer.payload.text, size: answer.payload.big.length, transport: answer.transport };
      result.last = engine.transport.name;
      finish(0);
    });
  };
  if (engine.transport.name === "websocket") {
    result.upgraded = "websocket";
    send();
  } else {
    engine.once("upgrade", (transport) => {
      result.upgraded = transport.name;
      send();
    });
  }
});
