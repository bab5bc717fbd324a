// The kiosk screen: asks over a WebSocket to `kioskd web`, shows the streamed answer and the
// kiosk's status. No framework and no build step; it must work offline.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const question = $("question");
  const askButton = $("ask");
  const stopButton = $("stop");
  const newButton = $("new");
  const answer = $("answer");
  const status = $("status");
  const notice = $("notice");

  // The page speaks the browser's language; "online" and "offline" stay as they are (the same
  // words in both languages, and what people see on the kiosk's dashboard).
  const language = navigator.language || "en";
  document.documentElement.lang = language;
  const STRINGS = {
    en: {
      title: "Kiosk",
      label: "Your question",
      placeholder: "Type your question here",
      ask: "Ask",
      stop: "Stop",
      new: "New conversation",
      answerLabel: "Answer",
      waiting: "Waiting for the kiosk…",
      position: (n) => `Waiting in line: position ${n}.`,
      stopped: "Stopped.",
      cut: "The answer reached its length limit.",
      busy: (s) => (s === null ? "The kiosk is busy, try again in a moment."
        : s > 0 ? `The kiosk is busy, try again in ${s} s.` : "The kiosk is busy, try again now."),
      overheated: (s) => (s === null ? "The kiosk is too hot and is cooling down. Try again later."
        : s > 0 ? `The kiosk is too hot and is cooling down. Try again in ${s} s.`
          : "The kiosk was too hot. Try again now."),
      offline: "The kiosk is offline. Ask again when the status bar says online.",
      noBroker: "This screen cannot reach the kiosk's broker.",
      interrupted: "The connection to the kiosk was interrupted. Please ask again.",
      shuttingDown: "The kiosk is restarting. Try again in a moment.",
      lostService: "The connection to this screen's service was lost. Please ask again.",
      noService: "no connection to this screen's service, reconnecting",
      noStatus: "waiting for the kiosk",
      refused: (m) => `The kiosk did not take the question: ${m}`,
      failed: (m) => `The kiosk could not answer: ${m}`,
      states: { starting: "starting", loading: "starting", ready: "ready", busy: "answering",
        draining: "stopping" },
      cpu: (c) => `CPU ${c} °C`,
      throttled: "throttled",
      notThrottled: "not throttled",
      queue: (d, c) => `queue ${d}/${c}`,
    },
    de: {
      title: "Kiosk",
      label: "Ihre Frage",
      placeholder: "Frage hier eingeben",
      ask: "Fragen",
      stop: "Stopp",
      new: "Neues Gespräch",
      answerLabel: "Antwort",
      waiting: "Warte auf den Kiosk…",
      position: (n) => `In der Warteschlange: Platz ${n}.`,
      stopped: "Gestoppt.",
      cut: "Die Antwort hat ihre Längengrenze erreicht.",
      busy: (s) => (s === null ? "Der Kiosk ist ausgelastet, bitte gleich noch einmal."
        : s > 0 ? `Der Kiosk ist ausgelastet, bitte in ${s} s noch einmal.`
          : "Der Kiosk ist ausgelastet, bitte jetzt noch einmal."),
      overheated: (s) => (s === null ? "Der Kiosk ist zu heiß und kühlt ab. Bitte später noch einmal."
        : s > 0 ? `Der Kiosk ist zu heiß und kühlt ab. Bitte in ${s} s noch einmal.`
          : "Der Kiosk war zu heiß. Bitte jetzt noch einmal."),
      offline: "Der Kiosk ist offline. Bitte fragen, sobald die Statusleiste online zeigt.",
      noBroker: "Dieser Bildschirm erreicht den Broker des Kiosks nicht.",
      interrupted: "Die Verbindung zum Kiosk wurde unterbrochen. Bitte noch einmal fragen.",
      shuttingDown: "Der Kiosk startet neu. Bitte gleich noch einmal.",
      lostService: "Die Verbindung zum Dienst dieses Bildschirms ist abgerissen. Bitte noch einmal fragen.",
      noService: "keine Verbindung zum Dienst dieses Bildschirms, verbinde neu",
      noStatus: "warte auf den Kiosk",
      refused: (m) => `Der Kiosk hat die Frage nicht angenommen: ${m}`,
      failed: (m) => `Der Kiosk konnte nicht antworten: ${m}`,
      states: { starting: "startet", loading: "startet", ready: "bereit", busy: "antwortet",
        draining: "hält an" },
      cpu: (c) => `CPU ${c} °C`,
      throttled: "gedrosselt",
      notThrottled: "nicht gedrosselt",
      queue: (d, c) => `Warteschlange ${d}/${c}`,
    },
  };
  const T = STRINGS[language.toLowerCase().split("-")[0]] || STRINGS.en;
  document.title = T.title;
  $("question-label").textContent = T.label;
  question.placeholder = T.placeholder;
  askButton.textContent = T.ask;
  stopButton.textContent = T.stop;
  newButton.textContent = T.new;
  answer.setAttribute("aria-label", T.answerLabel);

  // --- the question and its answer ----------------------------------------------------------

  let current = null; // {id, text, timing} of the question on screen while it is open
  let countdown = null;
  // Sent with every question; a kiosk without conversations ignores it (docs/protocol.md).
  let conversationId = newConversationId();
  // Click and first-text times per question, for `kioskd bench web`.
  window.kioskdTimings = [];

  function newConversationId() {
    // 128 random bits: whoever knows a conversation's id can continue it (docs/security.md).
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return "c-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function setState(state, text, note = "") {
    answer.dataset.state = state;
    if (text !== null) answer.textContent = text;
    notice.textContent = note;
    const open = state === "queued" || state === "streaming";
    askButton.disabled = open;
    stopButton.disabled = !open;
  }

  function ask() {
    const text = question.value.trim();
    if (!text || current) return;
    stopCountdown();
    const timing = { clickMs: performance.now() };
    window.kioskdTimings.push(timing);
    if (!send({ type: "ask", question: text, conversation_id: conversationId })) {
      setState("error", T.lostService);
      return;
    }
    current = { id: null, text: "", timing };
    setState("queued", T.waiting);
  }

  function stop() {
    if (current) send({ type: "cancel" });
  }

  function startOver() {
    if (current) send({ type: "cancel" });
    current = null;
    stopCountdown();
    conversationId = newConversationId();
    question.value = "";
    setState("idle", "");
    question.focus();
  }

  function onStream(message) {
    if (!current || (message.id && current.id && message.id !== current.id)) return;
    if (message.restart) current.text = ""; // the kiosk answers it again from the start
    switch (message.type) {
      case "accepted":
        current.id = message.id;
        break;
      case "queued":
        setState("queued", T.position(message.position));
        break;
      case "chunk":
        if (answer.dataset.state !== "streaming") {
          const timing = current.timing;
          timing.firstTextMs = performance.now();
          requestAnimationFrame(() => setTimeout(() => { timing.paintedMs = performance.now(); }));
        }
        current.text += message.text;
        setState("streaming", current.text);
        answer.scrollTop = answer.scrollHeight;
        break;
      case "done":
        finish(message);
        break;
      default: // error, refused
        current.timing.done = message;
        current = null;
        showError(message);
    }
  }

  function finish(message) {
    const text = typeof message.text === "string" ? message.text : current.text;
    current.timing.done = message;
    current = null;
    if (message.finish_reason === "cancelled") setState("cancelled", text, T.stopped);
    else if (message.finish_reason === "length") setState("done", text, T.cut);
    else setState("done", text);
  }

  function showError(message) {
    const seconds = typeof message.retry_after_s === "number"
      ? Math.ceil(message.retry_after_s) : null;
    const words = {
      busy: T.busy, overheated: T.overheated,
    }[message.code];
    if (words) {
      let left = seconds;
      setState("error", words(left));
      if (left !== null) {
        countdown = setInterval(() => {
          left -= 1;
          answer.textContent = words(left);
          if (left <= 0) stopCountdown();
        }, 1000);
      }
      return;
    }
    const fixed = {
      offline: T.offline, no_broker: T.noBroker, interrupted: T.interrupted,
      shutting_down: T.shuttingDown,
    }[message.code];
    if (fixed) setState("error", fixed);
    else if (message.type === "refused" || message.code === "invalid_request") {
      setState("error", T.refused(message.message || message.code));
    } else setState("error", T.failed(message.message || message.code));
  }

  function stopCountdown() {
    if (countdown !== null) clearInterval(countdown);
    countdown = null;
  }

  // --- the status bar -----------------------------------------------------------------------

  let connected = false;
  let kiosk = null; // the service's latest view of the kiosk

  function showStatus() {
    let online = false;
    let parts;
    if (!connected) parts = ["offline", T.noService];
    else if (!kiosk || !kiosk.broker) parts = ["offline", T.noBroker];
    else if (kiosk.status === "offline") parts = ["offline"];
    else if (kiosk.status !== "online") parts = ["offline", T.noStatus];
    else {
      online = true;
      parts = ["online"];
      // A kiosk in thermal back-off says "throttled" once, below.
      if (kiosk.state && kiosk.state !== "throttled") {
        parts.push(T.states[kiosk.state] || kiosk.state);
      }
      if (kiosk.cpu_c !== null) parts.push(T.cpu(Math.round(kiosk.cpu_c)));
      if (kiosk.throttled !== null) parts.push(kiosk.throttled ? T.throttled : T.notThrottled);
      if (kiosk.queue_depth !== null && kiosk.queue_capacity !== null) {
        parts.push(T.queue(kiosk.queue_depth, kiosk.queue_capacity));
      }
    }
    status.textContent = parts.join(" · ");
    status.classList.toggle("online", online);
    status.classList.toggle("offline", !online);
    status.classList.toggle("hot", online && kiosk.throttled === true);
  }

  // --- the connection to `kioskd web`, re-made with backoff whenever it drops ---------------

  let socket = null;
  let retryMs = 500;
  let lastHeardMs = 0;

  function send(message) {
    if (!socket || socket.readyState !== WebSocket.OPEN) return false;
    socket.send(JSON.stringify(message));
    return true;
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    socket = new WebSocket(`${scheme}//${location.host}/ws`);
    socket.onopen = () => {
      connected = true;
      retryMs = 500;
      lastHeardMs = Date.now();
      showStatus();
    };
    socket.onmessage = (event) => {
      lastHeardMs = Date.now();
      const message = JSON.parse(event.data);
      if (message.type === "hello") question.maxLength = message.max_question_chars;
      else if (message.type === "kiosk") {
        kiosk = message;
        showStatus();
      } else if (message.type !== "ping") onStream(message);
    };
    socket.onclose = () => {
      socket = null;
      connected = false;
      kiosk = null;
      showStatus();
      if (current) {
        current = null;
        setState("error", T.lostService);
      }
      setTimeout(connect, retryMs + Math.random() * retryMs * 0.3);
      retryMs = Math.min(retryMs * 2, 10000);
    };
  }

  // The service sends something at least every 20 s; silence means a dead network path.
  setInterval(() => {
    if (socket && socket.readyState === WebSocket.OPEN && Date.now() - lastHeardMs > 50000) {
      socket.close();
    }
  }, 5000);

  askButton.addEventListener("click", ask);
  stopButton.addEventListener("click", stop);
  newButton.addEventListener("click", startOver);
  question.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ask();
    }
  });
  setState("idle", "");
  showStatus();
  connect();
})();
