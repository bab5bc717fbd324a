// Ask a kiosk one question over MQTT 5 and print the answer as it streams (Node.js 18+).
//
//   npm install mqtt@5
//   KIOSK_URL=mqtt://10.0.0.5:1883 KIOSK_PREFIX=kiosk/line-3 node mqtt-ask.mjs "What is MQTT?"
//
// It asks with an MQTT 5 Response Topic and Correlation Data, checks that every reply carries
// that correlation data and that `seq` has no gaps, and cancels the question on Ctrl-C.
// Exit status: 0 answered, 1 the kiosk answered with an error, 69 no broker, 124 no answer.
import { randomBytes } from "node:crypto";
import mqtt from "mqtt";

const url = process.env.KIOSK_URL ?? "mqtt://127.0.0.1:1883";
const prefix = process.env.KIOSK_PREFIX ?? "kiosk/line-3";
const question = process.argv.slice(2).join(" ") || "What is MQTT?";
const timeoutMs = 120_000;

const id = `js-${randomBytes(6).toString("hex")}`; // 1-64 characters of [A-Za-z0-9._-]
// The kiosk accepts a Response Topic only under one of its mqtt.reply_prefixes (default P/answer/).
const replyTopic = `${prefix}/answer/${id}`;
const correlation = Buffer.from(id);

const client = mqtt.connect(url, {
  protocolVersion: 5,
  connectTimeout: 5_000,
  reconnectPeriod: 0, // a one-shot client: report a missing broker instead of retrying
});
let connected = false;
let finished = false;
let shown = ""; // answer text printed so far
let nextSeq = 0;
const timer = setTimeout(() => cancelAndFinish(124, `no answer within ${timeoutMs / 1000} s`), timeoutMs);

function finish(code, why) {
  if (finished) return;
  finished = true;
  clearTimeout(timer);
  if (why) console.error(why);
  client.end(false, {}, () => process.exit(code));
}

async function cancelAndFinish(code, why) {
  // Cancel what you abandon, so the kiosk stops generating for nobody.
  if (connected && !finished) {
    await client.publishAsync(`${prefix}/cancel`, JSON.stringify({ id }), { qos: 1 }).catch(() => {});
  }
  finish(code, why);
}

client.on("connect", async () => {
  connected = true;
  try {
    // Subscribe first: the broker then routes every reply to us, the first one included.
    await client.subscribeAsync(replyTopic, { qos: 1 });
    await client.publishAsync(`${prefix}/ask`, JSON.stringify({ id, question }), {
      qos: 1,
      properties: { responseTopic: replyTopic, correlationData: correlation },
    });
  } catch (err) {
    finish(1, `cannot ask: ${err.message}`);
  }
});

client.on("message", (topic, payload, packet) => {
  const correlationData = packet.properties?.correlationData;
  if (topic !== replyTopic || !correlationData || !correlation.equals(Buffer.from(correlationData))) {
    return; // not a reply to this question
  }
  const message = JSON.parse(payload.toString("utf8"));
  if (message.restart) {
    // The kiosk crashed and answers again from the start: drop what was shown.
    process.stdout.write("\n[the kiosk restarted; the answer starts again]\n");
    shown = "";
    nextSeq = 0;
  }
  if (message.seq !== nextSeq) {
    finish(1, `stream gap: expected seq ${nextSeq}, got ${message.seq}`);
    return;
  }
  nextSeq += 1;
  if (message.type === "queued") {
    console.error(`[queued, position ${message.position}]`);
  } else if (message.type === "chunk") {
    shown += message.text;
    process.stdout.write(message.text);
  } else if (message.type === "done") {
    // The chunks join to done.text; with stream: false only done carries it.
    if (typeof message.text === "string" && message.text.startsWith(shown)) {
      process.stdout.write(message.text.slice(shown.length));
    }
    process.stdout.write("\n");
    finish(0);
  } else if (message.type === "error") {
    finish(1, `error ${message.code}: ${message.message}`);
  }
});

client.on("error", (err) => finish(69, `broker ${url}: ${err.message}`));
client.on("close", () => finish(69, connected ? `lost broker ${url}` : `cannot reach broker ${url}`));
process.on("SIGINT", () => cancelAndFinish(130, `interrupted; asked ${prefix} to cancel ${id}`));
