// A Node.js `ws` broadcast chat: a peer chatserver is measured against.
// Same frames as chatserver for what the benchmarks use (join -> joined,
// send -> ack + message to every member, per-room ids); in memory, nothing else.
//
//   node bench/peers/node/server.js PORT     (after `npm ci` in bench/peers/node)
"use strict";
const { WebSocketServer } = require("ws");

const port = Number(process.argv[2]);
const rooms = new Map();
const wss = new WebSocketServer({ host: "127.0.0.1", port, perMessageDeflate: false, backlog: 1024 });

wss.on("connection", (ws, req) => {
  const user = new URL(req.url, "http://x").searchParams.get("user") || "anonymous";
  const joined = new Set();
  ws.on("message", (data) => {
    const msg = JSON.parse(data);
    const name = msg.room;
    if (msg.type === "join") {
      let room = rooms.get(name);
      if (!room) rooms.set(name, (room = { members: new Set(), lastId: 0 }));
      room.members.add(ws);
      joined.add(name);
      ws.send(JSON.stringify({ type: "joined", ref: msg.ref, room: name, last_id: room.lastId }));
    } else if (msg.type === "send") {
      const room = rooms.get(name);
      if (!room || !room.members.has(ws)) {
        ws.send(JSON.stringify({ type: "error", ref: msg.ref, code: "not_member" }));
        return;
      }
      const id = ++room.lastId;
      const ts = Date.now();
      ws.send(JSON.stringify({ type: "ack", ref: msg.ref, room: name, id, ts }));
      // Serialised once, sent to every member.
      const frame = JSON.stringify({ type: "message", room: name, id, user, body: msg.body, ts });
      for (const member of room.members) member.send(frame);
    } else if (msg.type === "ping") {
      ws.send(JSON.stringify({ type: "pong", ref: msg.ref }));
    }
  });
  ws.on("close", () => {
    for (const name of joined) rooms.get(name).members.delete(ws);
  });
});

wss.on("listening", () => console.log(`node ws peer: open http://localhost:${port}/`));
