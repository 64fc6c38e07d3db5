// A socket.io server with its default settings (transports: polling, then the
// websocket upgrade) on 127.0.0.1, for tests/test_socketio.py.
// Prints one JSON line per event: {"listening": port}, then what it saw.
"use strict";
const http = require("http");
const { Server } = require("socket.io");

const server = http.createServer();
const io = new Server(server);
const say = (event) => process.stdout.write(JSON.stringify(event) + "\n");

// Engine.IO's own events: its connection always starts on polling, then upgrades.
io.engine.on("connection", (conn) => {
  say({ connection: conn.transport.name, forwarded: conn.request.headers["x-forwarded-proto"] || null });
  conn.on("upgrade", (transport) => say({ upgrade: transport.name }));
});
io.on("connection", (socket) => {
  socket.on("echo", (payload, ack) => ack({ payload, transport: socket.conn.transport.name }));
});

server.listen(0, "127.0.0.1", () => say({ listening: server.address().port }));
process.stdin.on("end", () => process.exit(0));   // the test closes stdin to stop us
process.stdin.resume();
