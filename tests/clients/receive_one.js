// Receives the first transaction with changes from a pgdeltastream websocket, as a user
// of Node's `ws` would: default settings, but for the message size limit (raised, as the
// docs/api.md says for large transactions). Acks it, closes normally, and prints a JSON
// summary on stdout.
//
// usage: NODE_PATH=.tools/node/node_modules node receive_one.js WS_URL

const WebSocket = require("ws");

const ws = new WebSocket(process.argv[2], { maxPayload: 0 });
ws.on("message", (data) => {
  const message = JSON.parse(data.toString());
  if (!message.change || message.change.length === 0) return;
  const changes = message.change;
  ws.send(JSON.stringify({ lsn: message.nextlsn }), () => ws.close(1000, "done"));
  console.log(
    JSON.stringify({
      changes: changes.length,
      nextlsn: message.nextlsn,
      first: changes[0].columnvalues,
      last: changes[changes.length - 1].columnvalues,
    }),
  );
});
ws.on("close", (code, reason) => {
  if (code !== 1000) {
    console.error(`closed with ${code} ${reason}`);
    process.exit(1);
  }
});
ws.on("error", (e) => {
  console.error(e);
  process.exit(1);
});
